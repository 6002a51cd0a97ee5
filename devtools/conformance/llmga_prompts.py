"""LLMGA's prompt format, as facts from the released code (dvlab-research/LLMGA).

    python -m devtools.conformance llmga_prompts --reference <checkout of dvlab-research/LLMGA>

Writes tests/conformance/llmga_prompts/facts.json:
  - every conversation template of `llmga/llava/conversation.py` (system prompt, roles, separators), and the
    exact text `get_prompt()` renders for an LLMGA first turn and an edit's second turn with `llava_llama_2`;
  - the user templates of `llmga/llava/prompt_temp.py` the training data draws from (regen / inpaint /
    outpaint), and the first turn the editing CLI sends before the user's instruction;
  - the CLIs' model-name -> conversation-mode rule and the LLaVA model types of the released configs;
  - the CLIs' prompt extraction run on a fixed set of responses (the reference's own code, executed here:
    its `caption.find("<gen_image>")` block is read from each CLI script and run on every string).
The conversation module is imported with stub `llmga` / `llmga.llava` packages: the real package imports its
model code (torch, flash attention) at import time, which none of these strings needs.
"""
from __future__ import annotations

import importlib
import json
import re
import sys
import textwrap
import types
from pathlib import Path

REFERENCE = "dvlab-research/LLMGA"

# Responses for the extraction facts: both tags in the released form, and the cases where the pack differs.
RESPONSES = [
    "<gen_image> a red fox in the snow, soft light </gen_image>",
    "Sure. <gen_image> A cozy cabin at dusk, warm windows, pine trees. </gen_image> Enjoy!",
    "<gen_image>no space after the tag</gen_image>",
    "<gen_image>  two spaces, then the prompt  </gen_image>",
    "<gen_image> line one\nline two </gen_image>",
    "<gen_image> first </gen_image> and <gen_image> second </gen_image>",
    "<gen_image> only an opening tag and the rest",
    "text before a closing tag </gen_image> after",
    "</gen_image> closing before <gen_image> opening",
    "no tags at all",
    "<gen_img> the paper's tag </gen_img>",
    "<GEN_IMAGE> upper case </GEN_IMAGE>",
    "",
]


def _import_reference_modules(root: Path) -> dict:
    """llmga.llava.{constants, conversation, prompt_temp}, imported from `root` without llmga/__init__."""
    saved = {name: module for name, module in sys.modules.items() if name == "llmga" or name.startswith("llmga.")}
    for name in saved:
        del sys.modules[name]
    try:
        for name, folder in (("llmga", root / "llmga"), ("llmga.llava", root / "llmga" / "llava")):
            package = types.ModuleType(name)
            package.__path__ = [str(folder)]
            sys.modules[name] = package
        sys.path.insert(0, str(root))
        try:
            return {name: importlib.import_module(f"llmga.llava.{name}")
                    for name in ("constants", "conversation", "prompt_temp")}
        finally:
            sys.path.remove(str(root))
    finally:
        for name in [n for n in sys.modules if n == "llmga" or n.startswith("llmga.")]:
            del sys.modules[name]
        sys.modules.update(saved)


def _as_function(block: str):
    """The CLIs' extraction block (it rewrites `caption`) as a function, imported from a temporary module."""
    import importlib.util
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "llmga_cli_extraction.py"
        path.write_text("def extract(caption):\n" + textwrap.indent(block, "    ") + "\n    return caption\n")
        spec = importlib.util.spec_from_file_location("llmga_cli_extraction", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module.extract


def _extraction_block(script: str) -> str:
    """The CLI's extraction: from `id1=caption.find("<gen_image>")` to its last `caption = ...` branch."""
    lines = script.splitlines()
    start = next(i for i, line in enumerate(lines) if 'id1=caption.find("<gen_image>")' in line.replace(" ", ""))
    end = next(i for i in range(start, len(lines)) if "caption[id1+num_space:id2]" in lines[i].replace(" ", ""))
    return textwrap.dedent("\n".join(lines[start:end + 1]))


def _conversation_mode_rule(script: str) -> dict:
    """The CLI's `if '<name part>' in model_name.lower(): conv_mode = "<mode>"` chain, in order."""
    pairs = re.findall(r"""if\s+['"]([^'"]+)['"]\s+in\s+model_name\.lower\(\):\s*\n"""
                       r"""\s*conv_mode\s*=\s*["']([^"']+)["']""", script)
    default = re.search(r"""else:\s*\n\s*conv_mode\s*=\s*["']([^"']+)["']""", script)
    return {"rules": [list(p) for p in pairs], "default": default.group(1) if default else None}


def regenerate(reference: Path, out: Path) -> None:
    modules = _import_reference_modules(reference)
    conversation, constants, templates = modules["conversation"], modules["constants"], modules["prompt_temp"]

    convs = {}
    for name, conv in conversation.conv_templates.items():
        convs[name] = {"system": conv.system, "roles": list(conv.roles), "sep_style": conv.sep_style.name,
                       "sep": conv.sep, "sep2": conv.sep2, "version": conv.version}

    image_token = constants.DEFAULT_IMAGE_TOKEN
    rendered = {}
    for task, text in (("similar", templates.regen_prompt[3]), ("inpaint", templates.inpaint_prompt[1]),
                       ("outpaint", templates.outpaint_prompt[0])):
        conv = conversation.conv_templates["llava_llama_2"].copy()
        conv.append_message(conv.roles[0], image_token + "\n" + text)
        conv.append_message(conv.roles[1], None)
        rendered[task] = conv.get_prompt()

    serve = reference / "llmga" / "serve"
    editing = (serve / "cli-sd15-editing.py").read_text()
    first_turn = re.search(r"""if i==0:\s*\n\s*inp\s*=\s*"([^"]*)\"""", editing).group(1)
    conv = conversation.conv_templates["llava_llama_2"].copy()
    conv.append_message(conv.roles[0], image_token + "\n" + first_turn)
    conv.append_message(conv.roles[1], "<gen_image> a cat on a sofa </gen_image>")
    conv.append_message(conv.roles[0], "make it winter")
    conv.append_message(conv.roles[1], None)
    rendered["edit_second_turn"] = conv.get_prompt()

    blocks = {path.name: _extraction_block(path.read_text()) for path in sorted(serve.glob("cli*.py"))
              if "caption.find" in path.read_text()}
    if len(set(blocks.values())) != 1:
        raise RuntimeError(f"the CLIs extract the prompt differently: {sorted(blocks)}; record each")
    block = next(iter(blocks.values()))
    extract = _as_function(block)
    extraction = [{"response": response, "reference": extract(response)} for response in RESPONSES]

    model_types = {}
    for path in sorted((reference / "llmga" / "llava" / "model" / "language_model").glob("*.py")):
        found = re.search(r"""model_type\s*=\s*["']([^"']+)["']""", path.read_text())
        if found:
            model_types[path.stem] = found.group(1)

    facts = {
        "tags": [constants.DEFAULT_OUTPUT_START_TOKEN, constants.DEFAULT_OUTPUT_END_TOKEN],
        "image_token": image_token,
        "conversations": convs,
        "rendered_llava_llama_2": rendered,
        "user_templates": {"similar": list(templates.regen_prompt), "inpaint": list(templates.inpaint_prompt),
                           "outpaint": list(templates.outpaint_prompt)},
        "edit_first_turn": first_turn,
        "conversation_mode": _conversation_mode_rule((serve / "cli.py").read_text()),
        "llava_model_types": model_types,
        "extraction_scripts": sorted(blocks),
        "extraction": extraction,
    }
    (out / "facts.json").write_text(json.dumps(facts, indent=1, ensure_ascii=False) + "\n")
