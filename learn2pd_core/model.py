"""Model adapter: any masked-diffusion LM behind one small interface (logits for a batch of sequences).

Model-specific facts (mask id, end-of-text ids, padding, remote code, dtype) live in MODEL_SPECS, keyed by
the checkpoint's `model_type`; everything else goes through transformers' auto classes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .errors import ModelLoadError

TINY_CHECKPOINT = Path(__file__).parent / "tiny" / "checkpoint"


@dataclass(frozen=True)
class ModelSpec:
    mask_token_id: int
    eos_token_ids: tuple[int, ...]      # every id that ends the text; the first one is used as padding
    pad_token_id: int                   # left padding of batched prompts; never the mask id
    auto_class: str = "AutoModelForMaskedLM"
    trust_remote_code: bool = False
    gpu_dtype: torch.dtype = torch.bfloat16


MODEL_SPECS = {
    # LLaDA-8B-Instruct (GSAI-ML/LLaDA-8B-Instruct): <|mdm_mask|> 126336, <|endoftext|> 126081 (EOS and the
    # SFT padding), <|eot_id|> 126348. Its modelling code ships with the checkpoint (AutoModel -> LLaDAModelLM).
    "llada": ModelSpec(126336, (126081, 126348), 126081, auto_class="AutoModel", trust_remote_code=True),
}


class DiffusionLM:
    """A loaded mask predictor: `model(input_ids, attention_mask) -> logits [B, T, V]`."""

    def __init__(self, model, tokenizer, mask_token_id: int, eos_token_ids: Sequence[int], pad_token_id: int,
                 name: str = "custom", use_chat_template: bool | None = None, max_length: int | None = None):
        if pad_token_id == mask_token_id:
            raise ModelLoadError(f"{name}: the padding id equals the mask id ({mask_token_id}); padded prompts would be "
                                 "decoded as masks. Give the tokenizer a pad token that is not the mask token")
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.mask_token_id, self.pad_token_id = int(mask_token_id), int(pad_token_id)
        self.eos_token_ids = tuple(int(i) for i in eos_token_ids)
        if use_chat_template is None:
            use_chat_template = getattr(tokenizer, "chat_template", None) is not None
        self.use_chat_template = use_chat_template
        self.max_length = max_length

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def encode_prompt(self, text: str, chat: bool | None = None) -> list[int]:
        """Token ids of a user prompt, through the chat template when the model has one (and `chat` allows)."""
        if self.tokenizer is None:
            raise ModelLoadError(f"{self.name} has no tokenizer; pass prompts as token-id lists")
        if self.use_chat_template if chat is None else chat:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                      add_generation_prompt=True, tokenize=False)
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return list(self.tokenizer(text)["input_ids"])

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True) if self.tokenizer else ""


def _resolve_source(name_or_path: str) -> tuple[str, bool]:
    """(where to load from, is it a local directory)."""
    if name_or_path == "tiny":
        if not (TINY_CHECKPOINT / "config.json").is_file():
            raise ModelLoadError(f"the embedded tiny model is missing at {TINY_CHECKPOINT}; "
                                 "recreate it with `python -m learn2pd_core.tiny.train --out learn2pd_core/tiny/checkpoint`")
        return str(TINY_CHECKPOINT), True
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is not a model directory (no config.json); pass a directory written by "
                                 "save_pretrained or a Hugging Face hub id")
        return str(path), True
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise ModelLoadError(f"model directory {name_or_path} does not exist; check the path")
    return name_or_path, False


def _from_pretrained(load, source: str, local: bool, **kwargs):
    """Local cache first, then the hub (unless HF_HUB_OFFLINE is set): offline failures are quick."""
    try:
        return load(source, local_files_only=True, **kwargs)
    except OSError:
        if local or os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
            raise
        return load(source, **kwargs)


def _config_dict(source: str, **kwargs) -> dict:
    """The checkpoint's raw config.json, read without executing any remote code."""
    from transformers import PretrainedConfig
    return PretrainedConfig.get_config_dict(source, **kwargs)[0]


def load_model(name_or_path: str = "tiny", device: str | torch.device | None = None,
               dtype: torch.dtype | None = None, trust_remote_code: bool | None = None) -> DiffusionLM:
    """Load "tiny" (the embedded model), a local checkpoint directory, or a Hugging Face hub id."""
    import transformers

    source, local = _resolve_source(name_or_path)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        raw = _from_pretrained(_config_dict, source, local)
        spec = MODEL_SPECS.get(raw.get("model_type", ""))
        remote = spec.trust_remote_code if (spec and trust_remote_code is None) else bool(trust_remote_code)
        if "auto_map" in raw and not remote:
            raise ModelLoadError(f"{name_or_path} ships its own modelling code; pass trust_remote_code=True "
                                 "if you trust it")
        if dtype is None:
            dtype = (spec.gpu_dtype if spec else torch.bfloat16) if device.type == "cuda" else torch.float32
        loader = getattr(transformers, spec.auto_class if spec else "AutoModelForMaskedLM")
        tokenizer = _from_pretrained(transformers.AutoTokenizer.from_pretrained, source, local, trust_remote_code=remote)
        model = _from_pretrained(loader.from_pretrained, source, local, trust_remote_code=remote, dtype=dtype)
    except ModelLoadError:
        raise
    except (OSError, ValueError, ImportError) as e:
        raise ModelLoadError(
            f"cannot load model {name_or_path!r}: {str(e).splitlines()[0]} -- provide the weights as a local directory "
            f"(--model /path/to/checkpoint) or populate the Hugging Face cache first "
            f"(`hf download {name_or_path}` on a machine with hub access, then copy ~/.cache/huggingface)") from None
    model = model.to(device).eval()
    mask_id = spec.mask_token_id if spec else tokenizer.mask_token_id
    eos_ids = spec.eos_token_ids if spec else (tokenizer.eos_token_id,)
    if mask_id is None or eos_ids[0] is None:
        raise ModelLoadError(f"{name_or_path}: the tokenizer defines no mask or end-of-text token; "
                             "add them or register the model in learn2pd_core.model.MODEL_SPECS")
    pad_id = spec.pad_token_id if spec else (tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0])
    max_len = raw.get("max_sequence_length") or raw.get("max_position_embeddings")
    if max_len and raw.get("model_type", "").startswith(("roberta", "xlm-roberta")):
        max_len -= (raw.get("pad_token_id") or 0) + 1   # RoBERTa positions start after the padding index
    return DiffusionLM(model, tokenizer, mask_id, eos_ids, pad_id, name=name_or_path, max_length=max_len)

