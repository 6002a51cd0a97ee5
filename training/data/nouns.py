"""The caption words the bootstrapper looks for: whole-word matches of a noun vocabulary.

A fixed vocabulary instead of a part-of-speech tagger: it runs offline, is deterministic, and a user can
read (and replace, `--nouns FILE`: one noun per line, `#` comments) exactly which words become crops.
Plurals are matched too ("dogs" -> "dog", "men" -> "man"); multi-word nouns ("teddy bear") win over
their parts; every occurrence is found, the bootstrapper uses a noun's first one.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# Words whose crop may become a head crop (MUMU §4 swaps 70 % of person crops for the person's head).
PERSON_NOUNS = frozenset("""person man woman boy girl child kid baby lady guy gentleman player
skier surfer skateboarder rider cyclist teenager toddler""".split())

# COCO's object categories plus common scene words and the person words above.
DEFAULT_NOUNS = sorted(PERSON_NOUNS | set("""
bicycle car motorcycle airplane bus train truck boat scooter tractor helicopter rocket
bench chair sofa couch bed table desk lamp shelf cabinet mirror sink toilet bathtub window door fireplace
bird cat dog horse sheep cow elephant bear zebra giraffe lion tiger monkey rabbit fox wolf deer duck owl
fish turtle frog butterfly dinosaur dragon robot unicorn
backpack umbrella handbag tie suitcase hat helmet glasses sunglasses jacket dress shirt shoe boot scarf
frisbee skis snowboard ball kite skateboard surfboard racket guitar piano violin drum
bottle glass cup fork knife spoon bowl plate vase pot
banana apple orange broccoli carrot pizza donut cake sandwich burger bread cheese strawberry
laptop phone keyboard mouse television camera clock book computer microphone
tree flower plant grass rose sunflower mountain river lake beach ocean wave waterfall forest
house building castle tower bridge church tent fence statue fountain
car wheel flag sign balloon candle crown sword shield
""".split()) | {"teddy bear", "stop sign", "fire hydrant", "traffic light", "hot dog", "potted plant",
                "cell phone", "dining table", "baseball bat", "baseball glove", "tennis racket",
                "wine glass", "hair drier", "parking meter"})

IRREGULAR_PLURALS = {"man": "men", "woman": "women", "child": "children", "person": "people",
                     "mouse": "mice", "knife": "knives", "wolf": "wolves", "shelf": "shelves",
                     "fish": "fish", "sheep": "sheep", "deer": "deer", "skis": "skis", "glasses": "glasses",
                     "sunglasses": "sunglasses"}


@dataclass(frozen=True)
class NounMatch:
    noun: str  # the vocabulary noun (what the detector is asked for)
    word: str  # the caption text it matched, as written
    start: int  # character span in the caption
    end: int


def plural(noun: str) -> str:
    head, _, last = noun.rpartition(" ")
    if last in IRREGULAR_PLURALS:
        form = IRREGULAR_PLURALS[last]
    elif re.search(r"(s|x|z|ch|sh|o)$", last):
        form = last + "es"
    elif re.search(r"[^aeiou]y$", last):
        form = last[:-1] + "ies"
    else:
        form = last + "s"
    return f"{head} {form}" if head else form


def load_nouns(path: str | Path | None) -> list[str]:
    """The default vocabulary, or the nouns listed in `path` (one per line, lowercase, `#` comments)."""
    if path is None:
        return list(DEFAULT_NOUNS)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"noun list {path} not found: give a text file with one noun per line")
    nouns = [line.split("#", 1)[0].strip().lower() for line in path.read_text(encoding="utf-8").splitlines()]
    nouns = sorted({n for n in nouns if n})
    if not nouns:
        raise ValueError(f"noun list {path} holds no nouns: write one noun per line")
    return nouns


class NounMatcher:
    """Finds vocabulary nouns (and their plurals) as whole words in a caption, case-insensitively."""

    def __init__(self, nouns: list[str]):
        forms = {noun: noun for noun in nouns}  # a listed word is itself, even if it is another's plural
        for noun in nouns:
            forms.setdefault(plural(noun), noun)
        # Longest first, so the regex alternation prefers "teddy bear" over "bear".
        alternatives = sorted(forms, key=lambda f: (-len(f), f))
        self._forms = forms
        self._pattern = re.compile(r"(?<![\w-])(" + "|".join(re.escape(f).replace(r"\ ", r"\s+")
                                                              for f in alternatives) + r")(?![\w-])",
                                   re.IGNORECASE)

    def find(self, caption: str) -> list[NounMatch]:
        """Every match in reading order."""
        matches = []
        for m in self._pattern.finditer(caption):
            form = re.sub(r"\s+", " ", m.group(1).lower())
            matches.append(NounMatch(self._forms[form], m.group(1), m.start(1), m.end(1)))
        return matches

    def first_occurrences(self, caption: str) -> list[NounMatch]:
        """One match per noun, its first, in reading order."""
        seen, firsts = set(), []
        for match in self.find(caption):
            if match.noun not in seen:
                seen.add(match.noun)
                firsts.append(match)
        return firsts
