"""What travels with the weights besides them: token ids, generation config, tokenizer files,
the released Pangu modelling code.

A layout folder's config.json names the special tokens (bos/eos/pad ids) that its
generation_config.json and tokenizer files also use; moge's own config has no field for
them (its models are byte-level). So that a checkpoint converted layout -> layout, or
layout -> moge run -> layout, still generates and tokenizes as before, convert copies
these files verbatim and carries the token ids into the new config.json. A moge run keeps
them in `<run>/hf/` (the ids in hf/token_ids.json), where nothing else reads them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

SIDE_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    # The released Pangu Pro MoE code, which config.json's auto_map names (trust_remote_code
    # loads it from the checkpoint's folder): without it the converted checkpoint cannot load.
    "configuration_pangu_moe.py",
    "modeling_pangu_moe.py",
)
# transformers' named chat templates other than the default: <dir>/<name>.jinja, each read
# as the template <name> (tokenization_utils_base, CHAT_TEMPLATE_DIR).
CHAT_TEMPLATE_DIR = "additional_chat_templates"
TOKEN_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")
RUN_DIR = "hf"  # where a moge run folder keeps them
TOKEN_IDS = "token_ids.json"


def token_ids(config: dict[str, Any]) -> dict[str, Any]:
    """The special-token fields a config.json sets (null ones included: they mean "none")."""
    return {k: config[k] for k in TOKEN_FIELDS if k in config}


def run_side_dir(run_root: Path) -> Path:
    return run_root / RUN_DIR


def run_root_of(checkpoint_folder: Path) -> Path:
    """The run folder that holds <run>/checkpoints/<step>/ (a checkpoint folder kept
    elsewhere: itself, so that no unrelated hf/ folder is read)."""
    parent = checkpoint_folder.resolve().parent
    return parent.parent if parent.name == "checkpoints" else checkpoint_folder


def side_dir_of(src: Path) -> tuple[Path, bool]:
    """(the folder holding a source's token ids and side files, whether it is a layout folder)
    of a layout folder (config.json), a moge run folder or a checkpoint folder."""
    if (src / "config.json").is_file():
        return src, True
    from moge.training.checkpoint import find_checkpoint  # keep this module light

    return run_side_dir(run_root_of(find_checkpoint(src))), False


def read_source(src: Path) -> tuple[Path, dict[str, Any]]:
    """(the folder of a source's side files, its token ids): read before anything is
    written, so a damaged file stops a conversion with nothing half done."""
    side, from_layout = side_dir_of(src)
    return side, read_token_ids(side, from_layout)


def store_in_run(side: Path, ids: dict[str, Any], dst_run: Path) -> None:
    """Copy the side files of `side` and the token ids into the moge run dst_run's hf/ folder."""
    copy_side_files(side, run_side_dir(dst_run))
    write_token_ids(run_side_dir(dst_run), ids)


def read_token_ids(side_dir: Path, layout_folder: bool) -> dict[str, Any]:
    """The token ids a source carries: its config.json's (a layout folder) or hf/token_ids.json."""
    file = side_dir / ("config.json" if layout_folder else TOKEN_IDS)
    if not file.is_file():
        return {}
    try:
        found = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"{file}: not JSON ({err})") from err
    if not isinstance(found, dict):
        raise ValueError(f"{file}: expected a JSON object")
    return token_ids(found)


def _side_file_names(src_dir: Path) -> list[str]:
    """The side files src_dir has, relative to it (the named chat templates' folder included)."""
    names = [name for name in SIDE_FILES if (src_dir / name).is_file()]
    templates = src_dir / CHAT_TEMPLATE_DIR
    if templates.is_dir():
        names += sorted(f"{CHAT_TEMPLATE_DIR}/{f.name}" for f in templates.glob("*.jinja") if f.is_file())
    return names


def copy_side_files(src_dir: Path, dst_dir: Path) -> list[Path]:
    """Copy every side file src_dir has into dst_dir (created when there is one); returns the copies."""
    copies = []
    for name in _side_file_names(src_dir):
        (dst_dir / name).parent.mkdir(parents=True, exist_ok=True)
        copies.append(Path(shutil.copyfile(src_dir / name, dst_dir / name)))
    return copies


def write_token_ids(dst_dir: Path, ids: dict[str, Any]) -> None:
    if ids:
        dst_dir.mkdir(parents=True, exist_ok=True)
        (dst_dir / TOKEN_IDS).write_text(json.dumps(ids, indent=2) + "\n", encoding="utf-8")
