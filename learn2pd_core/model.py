"""Model runner: any masked-diffusion LM behind one small interface (logits at chosen positions of a batch).

LLaDA checkpoints (config.json `model_type: "llada"`: LLaDA-8B-Instruct, LLaDA-8B-Base, LLaDA-1.5, and the embedded
tiny model) run on this project's own implementation (`learn2pd_core.llada`), never on the checkpoint's modelling
code; every other model goes through transformers' masked-LM auto class.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

from .errors import ConfigError, ModelLoadError
from .llada import MODEL_TYPE as LLADA, LLaDA, LLaDAConfig, load_llada, positions_from_mask, shard_files

TINY_CHECKPOINT = Path(__file__).parent / "tiny" / "checkpoint"
# LLaDA-Instruct ends an assistant turn with <|eot_id|> as well as <|endoftext|> (its config's eos_token_id).
END_OF_TURN = "<|eot_id|>"


class DiffusionLM:
    """A loaded mask predictor and its tokenizer. Calling it runs one forward pass. Positions, masks, the KV
    cache and which logits to compute are decided by the caller: the engine's per-batch runner
    (`learn2pd_core.forward.BlockForward`)."""

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
        # LLaDA (ours) takes positions and computes only the logits asked for; a transformers model computes all.
        self.native = isinstance(model, LLaDA)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 logits_at: torch.Tensor | None = None, *, positions: torch.Tensor | None = None,
                 kv_cache=None, write_at: torch.Tensor | None = None, return_kv: bool = False):
        """input_ids [B, T], attention_mask [B, Tk] over the keys (False: padding or cut, never attended; None:
        all real), logits_at [B, K] positions to return logits for (None: all) -> logits [B, K or T, V].
        LLaDA only: positions [B, T] (default: counted from each row's first real token, so a left-padded row is
        the row alone exactly), kv_cache (per-layer keys/values of all Tk key positions, which this forward
        overwrites at write_at [B, T] with its own) and return_kv (-> (logits, per-layer keys/values) to fill one)."""
        if self.native:
            if positions is None and attention_mask is not None and kv_cache is None:
                positions = positions_from_mask(attention_mask)
            out = self.model(input_ids, attention_mask, positions, logits_at=logits_at, return_kv=return_kv,
                             kv_cache=kv_cache, write_at=write_at)
            return (out.logits, out.kv) if return_kv else out.logits
        if positions is not None or kv_cache is not None or return_kv:
            raise ConfigError(f"{self.name}: a KV cache needs a LLaDA checkpoint (model_type llada), which learn2pd "
                              "runs natively; decode this model without cache")
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        if logits_at is None:
            return logits
        return logits.gather(1, logits_at[..., None].expand(-1, -1, logits.shape[-1]))

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


_WEIGHTS_FIX = ("provide the weights as a local directory (--model /path/to/checkpoint) or populate the Hugging Face "
                "cache first (`hf download <id>` on a machine with hub access, then copy ~/.cache/huggingface)")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def _from_pretrained(load, source: str, local: bool, **kwargs):
    """Local cache first, then the hub (unless HF_HUB_OFFLINE is set): offline failures are quick."""
    try:
        return load(source, local_files_only=True, **kwargs)
    except OSError:
        if local or _offline():
            raise
        return load(source, **kwargs)


def _config_dict(source: str, **kwargs) -> dict:
    """The checkpoint's raw config.json, read without executing any remote code."""
    from transformers import PretrainedConfig
    return PretrainedConfig.get_config_dict(source, **kwargs)[0]


def _snapshot(repo_id: str, **kwargs) -> str:
    """A hub checkpoint's local folder (data files only: modelling code is never fetched)."""
    from huggingface_hub import snapshot_download
    return snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"], **kwargs)


def check_model(name_or_path: str = "tiny") -> str:
    """What load_model reads before the weights, without loading them: the checkpoint is there, its config
    parses and (LLaDA) names a variant we implement, and every weight file it needs exists. The jobs call it
    in the driver, so that a wrong --model is one line before Ray starts rather than a failure in every actor.
    Returns the checkpoint's model_type."""
    source, local = _resolve_source(name_or_path)
    try:
        raw = _from_pretrained(_config_dict, source, local)
        if raw.get("model_type") != LLADA:
            return raw.get("model_type", "")   # transformers checkpoints: their files are known to transformers only
        folder = Path(source if local else _from_pretrained(_snapshot, source, local))
        LLaDAConfig.from_hub(raw)
        shard_files(folder)
        return LLADA
    except ModelLoadError:
        raise
    except OSError as e:
        raise ModelLoadError(f"cannot load model {name_or_path!r}: {_first_line(e)} -- {_WEIGHTS_FIX}") from None
    except ValueError as e:
        raise ModelLoadError(f"{name_or_path}: {_first_line(e)}") from None


def load_model(name_or_path: str = "tiny", device: str | torch.device | None = None,
               dtype: torch.dtype | None = None, trust_remote_code: bool = False) -> DiffusionLM:
    """Load "tiny" (the embedded LLaDA), a local checkpoint directory, or a Hugging Face hub id (from the local
    cache, or downloaded unless HF_HUB_OFFLINE=1). bf16 on CUDA, float32 on CPU unless `dtype` says otherwise.
    Every failure is one ModelLoadError line naming the checkpoint, the problem and the fix."""
    source, local = _resolve_source(name_or_path)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    stage = "reading config.json"
    try:
        raw = _from_pretrained(_config_dict, source, local)
        if raw.get("model_type") == LLADA:
            stage = "reading the checkpoint"
            folder = Path(source if local else _from_pretrained(_snapshot, source, local))
            return _load_llada(name_or_path, folder, raw, device, dtype)
        stage = "loading it with transformers" + (" and its own modelling code" if "auto_map" in raw else "")
        return _load_transformers(name_or_path, source, local, raw, device, dtype, trust_remote_code)
    except ModelLoadError:
        raise
    except OSError as e:
        raise ModelLoadError(f"cannot load model {name_or_path!r}: {_first_line(e)} -- {_WEIGHTS_FIX}") from None
    except Exception as e:   # a checkpoint can fail in any way (its own code, a corrupt file): always one line
        import transformers
        fix = (f"this checkpoint's own code does not run under transformers {transformers.__version__}; use a "
               "checkpoint transformers supports natively or a LLaDA checkpoint (model_type \"llada\", run natively)"
               if "auto_map" in raw else "check that the checkpoint folder is complete and uncorrupted (download it again)") \
            if stage.startswith("loading") else "download the checkpoint again"
        raise ModelLoadError(f"cannot load model {name_or_path!r} while {stage}: {type(e).__name__}: {_first_line(e)} "
                             f"-- {fix}") from None


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0]


def _load_llada(name: str, folder: Path, raw: dict, device: torch.device, dtype: torch.dtype) -> DiffusionLM:
    from transformers import AutoTokenizer, PretrainedConfig
    try:
        config = LLaDAConfig.from_hub(raw)
    except ValueError as e:
        raise ModelLoadError(f"{name}: {e}") from None
    # LLaDA's tokenizer is a plain fast tokenizer (tokenizer_config.json names its class): no remote code, whatever
    # auto_map says, and a blank config so transformers does not try to parse LLaDA's config.json itself.
    tokenizer = AutoTokenizer.from_pretrained(str(folder), config=PretrainedConfig(), trust_remote_code=False)
    model = load_llada(folder, config, device, dtype)
    vocab = tokenizer.get_vocab()
    mask_id = config.mask_token_id if config.mask_token_id is not None else tokenizer.mask_token_id
    eos_id = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
    if mask_id is None or eos_id is None:
        raise ModelLoadError(f"{name}: neither config.json nor the tokenizer names a mask or end-of-text token; "
                             "set mask_token_id and eos_token_id in config.json")
    eos_ids = (eos_id,) + ((vocab[END_OF_TURN],) if vocab.get(END_OF_TURN, eos_id) != eos_id else ())
    pad_id = next(i for i in (config.pad_token_id, tokenizer.pad_token_id, eos_id) if i is not None)
    return DiffusionLM(model, tokenizer, mask_id, eos_ids, pad_id, name=name, max_length=config.max_sequence_length)


def _load_transformers(name: str, source: str, local: bool, raw: dict, device: torch.device, dtype: torch.dtype,
                       trust_remote_code: bool) -> DiffusionLM:
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = raw.get("model_type", "")
    if "auto_map" in raw and not trust_remote_code:
        raise ModelLoadError(f"{name} ships its own modelling code; pass trust_remote_code=True if you trust it")
    if "auto_map" not in raw and model_type not in CONFIG_MAPPING:
        raise ModelLoadError(f"{name}: model_type {model_type!r} is neither LLaDA (which learn2pd runs natively) nor a "
                             f"model transformers {transformers.__version__} knows; use a LLaDA checkpoint or a "
                             "transformers masked LM")
    tokenizer = _from_pretrained(transformers.AutoTokenizer.from_pretrained, source, local,
                                 trust_remote_code=trust_remote_code)
    if tokenizer.mask_token_id is None or tokenizer.eos_token_id is None:
        raise ModelLoadError(f"{name}: its tokenizer defines no {'mask' if tokenizer.mask_token_id is None else 'end-of-text'} "
                             "token, which masked diffusion decoding needs; use a masked LM whose tokenizer has a mask "
                             "and an end-of-text (eos) token")
    model = _from_pretrained(transformers.AutoModelForMaskedLM.from_pretrained, source, local,
                             trust_remote_code=trust_remote_code, dtype=dtype)
    model = model.to(device).eval()
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    max_len = raw.get("max_position_embeddings")
    if max_len and model_type.startswith(("roberta", "xlm-roberta")):
        max_len -= (raw.get("pad_token_id") or 0) + 1   # RoBERTa positions start after the padding index
    return DiffusionLM(model, tokenizer, tokenizer.mask_token_id, (eos_id,), pad_id, name=name, max_length=max_len)
