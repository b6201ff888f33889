"""Write this package's model files into a checkpoint directory as its remote code.

Third-party tools that insist on ``trust_remote_code=True`` then run the maintained
implementation instead of the checkpoint's original files.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import tempfile
import time
from pathlib import Path

logger = logging.getLogger(__name__)

# The self-contained set: these modules import each other relatively and nothing else
# from this package.
REMOTE_CODE_FILES = (
    "configuration_qwen.py",
    "cpu_engine.py",
    "cpu_kernels.py",
    "cpu_memory.py",
    "gptq_kernels.py",
    "loading.py",
    "modeling_qwen.py",
    "tokenization_qwen.py",
    "qwen_generation_utils.py",
    "kv_cache.py",
    "kv_cache_kernels.py",
)
MODEL_AUTO_MAP = {
    "AutoConfig": "configuration_qwen.QWenConfig",
    "AutoModel": "modeling_qwen.QWenModel",
    "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel",
}
TOKENIZER_AUTO_MAP = {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]}


def _package_dir() -> Path:
    return Path(__file__).resolve().parent


def _replace_file(path: Path, data: bytes) -> None:
    """Put ``data`` at ``path`` as a new regular file (written beside it, then renamed onto
    it): a symbolic link there is replaced, not written through. Checkpoints in the
    Hugging Face cache are links into its shared, content-addressed ``blobs/``; writing
    through them would change the blob for every revision that shares it. The permission
    bits stay those of the file (or the link's target); a new file gets the umask's."""
    if path.exists():
        mode = stat.S_IMODE(os.stat(path).st_mode)  # the file's (or the link target's) own
    else:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask  # what open() would give a new file
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_json(path: Path) -> dict:
    """A checkpoint's JSON file as a dict; ValueError naming the file when it is not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); restore it from the checkpoint's source") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not an object; restore it from the source")
    return data


def _update_json(path: Path, key: str, value) -> None:
    data = _read_json(path) if path.exists() else {}
    data[key] = value
    _replace_file(path, (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def write_remote_code(ckpt_dir: str | Path, backup: bool = True) -> Path | None:
    """Copy the model files into ``ckpt_dir`` and point its ``auto_map`` at them.

    Files that would be replaced (the old ``*.py`` files, ``config.json`` and
    ``tokenizer_config.json``) are first copied into ``ckpt_dir/remote_code_backup-<time>/``,
    whose path is returned (``None`` when nothing was replaced or ``backup`` is False).
    Files that are symbolic links (a Hugging Face cache snapshot) are replaced by regular
    files; what they point to is left as it was.
    """
    ckpt = Path(ckpt_dir)
    config_path = ckpt / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{ckpt} has no config.json; is it a checkpoint directory?")
    model_type = _read_json(config_path).get("model_type")
    if model_type != "qwen":
        raise ValueError(f"{config_path} has model_type={model_type!r}, expected 'qwen'")
    if (ckpt / "tokenizer_config.json").exists():
        _read_json(ckpt / "tokenizer_config.json")  # before anything is written

    backup_dir = None
    if backup:
        replaced = [ckpt / n for n in REMOTE_CODE_FILES if (ckpt / n).exists()]
        replaced += [p for p in (config_path, ckpt / "tokenizer_config.json") if p.exists()]
        replaced += [p for p in ckpt.glob("*.py") if p not in replaced]
        if replaced:
            backup_dir = ckpt / time.strftime("remote_code_backup-%Y%m%d-%H%M%S")
            suffix = 1
            while backup_dir.exists():
                backup_dir = backup_dir.with_name(f"{backup_dir.name.split('.')[0]}.{suffix}")
                suffix += 1
            backup_dir.mkdir()
            for path in replaced:
                shutil.copy2(path, backup_dir / path.name)
            logger.info("backed up %d files to %s", len(replaced), backup_dir)

    src = _package_dir()
    for name in REMOTE_CODE_FILES:
        _replace_file(ckpt / name, (src / name).read_bytes())
    _update_json(config_path, "auto_map", MODEL_AUTO_MAP)
    _update_json(ckpt / "tokenizer_config.json", "auto_map", TOKENIZER_AUTO_MAP)
    return backup_dir
