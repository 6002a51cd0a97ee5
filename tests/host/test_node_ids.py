"""Node ids are a contract with saved workflows: once shipped, an id never disappears."""
import pytest

pytestmark = pytest.mark.host

SHIPPED_NODE_IDS = [
    "MMIG_BLIP2Loader",
    "MMIG_BLIP2Caption",
    "MMIG_AStarGuidance",
    "MMIG_LayeredEmbeddings",
    "MMIG_DiffRIRLoader",
    "MMIG_DiffRIRRestore",
    "MMIG_VLMLoader",
    "MMIG_MultimodalPrompt",
    "MMIG_AdapterLoader",
    "MMIG_MUMUEncode",
    "MMIG_MLLMDescribe",
    "MMIG_LoRAMerge",
    "MMIG_MUMULoader",
    "MMIG_MMSMLoader",
    "MMIG_MMSMApply",
    "MMIG_DirectInversion",
    "MMIG_PromptToPrompt",
]


def test_every_shipped_node_id_is_still_served(host):
    info = host.object_info()
    assert [n for n in SHIPPED_NODE_IDS if n not in info] == []


def test_every_pack_node_is_in_the_shipped_list(host):
    # A new node must be added to SHIPPED_NODE_IDS, so that later renames are caught.
    pack_nodes = [name for name, spec in host.object_info().items()
                  if name.startswith("MMIG_") and spec.get("category", "").startswith("MMIG")]
    assert sorted(pack_nodes) == sorted(SHIPPED_NODE_IDS)


def test_every_pack_node_is_described_and_every_input_has_a_tooltip(host):
    info = host.object_info()
    for node in SHIPPED_NODE_IDS:
        assert info[node]["category"] == "MMIG" and info[node]["description"], node
        for section in info[node]["input"].values():
            for name, spec in section.items():
                assert spec[1].get("tooltip"), f"{node}.{name} has no tooltip"
