"""Write each node's help page, web/docs/<node id>.md, which the newer frontend shows in its node library.

    python -m devtools.node_docs          # rewrite web/docs/ from the nodes' own descriptions and tooltips
    python -m devtools.node_docs --check  # exit 1 if a page is missing or out of date

For a custom node the frontend (ComfyUI_frontend's NodeHelpService) fetches
/extensions/<pack>/docs/<node id>/<locale>.md, then /extensions/<pack>/docs/<node id>.md, from the pack's
WEB_DIRECTORY; the host serves that folder. A page is: what the node does (its DESCRIPTION), the paper
equation it implements (PAPER below, the one thing written here by hand), and its inputs and outputs with their
tooltips, so the help never says something the node's tooltips do not.
"""
from __future__ import annotations

import argparse
import sys

from devtools.paths import REPO_ROOT

DOCS_DIR = REPO_ROOT / "web" / "docs"

# node id -> (paper and equation, as the pack implements it). A new node needs an entry: the test says so.
PAPER = {
    "MMIG_BLIP2Loader": "None: a loader. Its model is the f_BLIP2 of MMIG Eq. 4, used by MMIG BLIP-2 Caption.",
    "MMIG_BLIP2Caption": "MMIG Eq. 4: `d_new = f_BLIP2(I_new)`, the caption of a generated image, fed back into "
                         "the conversation.",
    "MMIG_VLMLoader": "None: a loader. Its model is the f_mllm of MMIG Eq. 1 and MUMU's vision-language model.",
    "MMIG_MultimodalPrompt": "None by itself: MUMU's interleaved prompt `x = [w_1, I_1, w_2, I_2, ...]` (text "
                             "spans and images in order), the input MMIG MUMU Encode turns into conditioning.",
    "MMIG_AdapterLoader": "None: a loader. The adapter maps the VLM's last hidden states to SDXL's context "
                          "(MUMU §3: `c = Adapter(h_VLM(x))`).",
    "MMIG_MUMUEncode": "MUMU §3: `c = Adapter(h_VLM(x))`, the interleaved prompt's VLM hidden states through the "
                       "adapter into SDXL cross-attention tokens and a pooled vector.",
    "MMIG_MLLMDescribe": "MMIG Eq. 1: `z_d = f_mllm(x, w)`, the response to image x and instruction w; in LLMGA "
                         "mode, the generation prompt between `<gen_image>` tags.",
    "MMIG_DiffRIRLoader": "None: a loader. Its network is the F_R of LLMGA Eq. 7.",
    "MMIG_DiffRIRRestore": "LLMGA Eq. 7: `I_res = F_R(concat(I_gen, (1 - M) * I_ref))`, with paste-back "
                           "`I_res * M + I_ref * (1 - M)`.",
    "MMIG_AStarGuidance": "MMIG Eqs. 19-20 (A-STAR): `z_t <- z_t - alpha_t * grad_z (L_AS + L_AR)`, segregation "
                          "L_AS between the concepts' attention maps and retention L_AR of each map from step to "
                          "step; mode attend_and_excite: Attend-and-Excite's `L = max_s (1 - max A_s)`.",
    "MMIG_LayeredEmbeddings": "MMIG Eqs. 15-18 (LayerDiffusion): `[e_a, e_b] = argmin E || M * (eps - "
                              "eps_theta(x_t, t, [e_a, e_b])) ||^2` (Eq. 15), `e_opt = alpha e_a + (1 - alpha) e_b` "
                              "(Eq. 16), L_fg and L_bg with a reference (Eqs. 17-18).",
    "MMIG_LoRAMerge": "LoRA (Hu et al.): `W' = W + strength * (alpha / r) * B A` per module, as MUMU merges its "
                      "UNet LoRA into fine-tunes (MUMU §5); LoHa, LoKr, DoRA by their own formulas.",
    "MMIG_MUMULoader": "None by itself: loads MUMU's bundle; the UNet LoRA merge is `W' = W + (alpha / r) B A` "
                       "(MUMU §5), the adapter is MUMU Encode's.",
    "MMIG_MMSMLoader": "None: a loader. The module is MMIG §3.2's MMSM (Eqs. 9-12), applied by MMIG MMSM Apply.",
    "MMIG_MMSMApply": "MMIG §3.2, Eqs. 9-12: `e_3 = MLP(e_0)`, `e_2 = DomainEncoder(e_1)`, `e_4 = "
                      "CrossAttention(e_2, e_3)`, `e_6 = e_1 + strength * DomainDecoder(e_4)`.",
    "MMIG_DirectInversion": "LLMGA §3.1 (Eq. 4's editing branch) with Direct Inversion (Ju et al., ICLR 2024): DDIM "
                            "inversion `z*_t = DDIM^-1(z*_{t-1}, c_src)` without CFG, keeping the trajectory "
                            "`z*_0 ... z*_T` for the offsets of MMIG Prompt-to-Prompt.",
    "MMIG_PromptToPrompt": "Prompt-to-prompt (Hertz et al. 2022) with Direct Inversion's source-branch offsets "
                           "`d_t = z*_{t-1} - rec_t`, added to the source branch only, so it reconstructs the "
                           "input exactly while the target branch takes its attention (LLMGA §3.1).",
}


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _type_name(spec) -> str:
    kind = spec[0] if isinstance(spec, (list, tuple)) and spec else spec
    if isinstance(kind, (list, tuple)):
        return "choice: " + ", ".join(f"`{v}`" for v in kind[:8]) + (", ..." if len(kind) > 8 else "")
    return f"`{kind}`"


def page(node_id: str, cls, display_name: str) -> str:
    lines = [f"# {display_name}", "", f"Node id `{node_id}`, category `{getattr(cls, 'CATEGORY', '')}`.", "",
             "## What it does", "", cls.DESCRIPTION.strip(), "", "## Paper equation", "", PAPER[node_id], "",
             "## Inputs", "", "| input | type | | default | what it is |", "|---|---|---|---|---|"]
    inputs = cls.INPUT_TYPES()
    for section in ("required", "optional"):
        for name, spec in inputs.get(section, {}).items():
            options = spec[1] if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict) else {}
            default = options.get("default", "")
            default = f"`{default}`" if default != "" else ""
            lines.append(f"| `{name}` | {_cell(_type_name(spec))} | {section} | {_cell(default)} | "
                         f"{_cell(options.get('tooltip', ''))} |")
    lines += ["", "## Outputs", "", "| output | type | what it is |", "|---|---|---|"]
    names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
    tips = getattr(cls, "OUTPUT_TOOLTIPS", None) or ("",) * len(cls.RETURN_TYPES)
    for name, kind, tip in zip(names, cls.RETURN_TYPES, tips):
        lines.append(f"| `{name}` | `{kind}` | {_cell(tip)} |")
    if getattr(cls, "OUTPUT_NODE", False):
        lines += ["", "Its text result is also shown on the node (the pack's frontend extension, web/js/mmig.js)."]
    return "\n".join(lines) + "\n"


def pages() -> dict[str, str]:
    """node id -> its help page, from the pack as the host imports it (the host must be importable)."""
    from devtools import tiny_sdxl
    tiny_sdxl.import_host()
    from devtools.pack import import_pack_module
    nodes = import_pack_module("nodes")
    missing = sorted(set(nodes.NODE_CLASS_MAPPINGS) - set(PAPER))
    if missing:
        raise KeyError(f"devtools/node_docs.py PAPER has no entry for {missing}: add which paper equation each "
                       f"implements (or 'None: a loader'), then run `python -m devtools.node_docs`.")
    return {node_id: page(node_id, cls, nodes.NODE_DISPLAY_NAME_MAPPINGS.get(node_id, node_id))
            for node_id, cls in nodes.NODE_CLASS_MAPPINGS.items()}


def stale(expected: dict[str, str]) -> list[str]:
    problems = [f"{DOCS_DIR / (k + '.md')} is missing or out of date" for k, text in expected.items()
                if not (DOCS_DIR / f"{k}.md").is_file() or (DOCS_DIR / f"{k}.md").read_text() != text]
    problems += [f"{p} belongs to no node" for p in sorted(DOCS_DIR.glob("*.md")) if p.stem not in expected]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only report missing or stale pages")
    args = parser.parse_args(argv)
    expected = pages()
    if args.check:
        problems = stale(expected)
        print("\n".join(problems) or f"{len(expected)} node help pages up to date")
        return 1 if problems else 0
    DOCS_DIR.mkdir(parents=True, exist_ok=True)
    for node_id, text in expected.items():
        (DOCS_DIR / f"{node_id}.md").write_text(text)
    for extra in DOCS_DIR.glob("*.md"):
        if extra.stem not in expected:
            extra.unlink()
    print(f"wrote {len(expected)} node help pages to {DOCS_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
