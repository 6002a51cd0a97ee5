"""`python -m devtools.tiny_vlm_families VLM_DIR [--only FAMILY ...]`"""
from devtools.tiny_vlm_families import main

main()
