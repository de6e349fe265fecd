"""LLaDA, the masked-diffusion transformer of LLaDA-8B (GSAI-ML), written by this project from its architecture
facts, and a loader for checkpoints in the hub's layout (config.json field names, sharded safetensors,
`model.transformer.*` parameter names). No `trust_remote_code`: the checkpoint's `.py` files are never read.

Architecture: token embedding, n_layers pre-norm blocks (RMSNorm -> bidirectional multi-head attention with
rotary positions on q and k -> residual; RMSNorm -> SiLU-gated MLP -> residual), a final RMSNorm and an untied
output layer. No biases anywhere.

Beyond the published code, the forward
- honours the 2-D attention mask as a key padding mask (the published code builds a bias and drops it), so a
  left-padded row gets the logits of the row alone;
- takes per-row positions (the runner counts them from each row's first real token);
- returns its keys/values (`return_kv`) and takes them back as a cache (`kv_cache`): this forward writes its own
  positions' keys/values into the cache in place (`write_at`) and attends over all of it, so a cached step
  computes only the positions it recomputes and copies nothing else;
- computes the output layer only at the positions asked for (`logits_at`): over a 126,464-token vocabulary
  it is the largest matmul of a decoding step, and a step reads logits of one block only.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ModelLoadError

MODEL_TYPE = "llada"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# config.json fields of the LLaDA family that select architecture variants this implementation does not have,
# with the value every published LLaDA checkpoint (8B-Instruct, 8B-Base, 1.5) uses. Anything else is refused.
_FIXED_FIELDS = {"block_type": "llama", "activation_type": "silu", "layer_norm_type": "rms", "rope": True,
                 "alibi": False, "include_bias": False, "include_qkv_bias": False, "bias_for_layer_norm": False,
                 "attention_layer_norm": False, "input_emb_norm": False, "scale_logits": False,
                 "layer_norm_with_affine": True, "block_group_size": 1, "clip_qkv": None}


@dataclass(frozen=True)
class LLaDAConfig:
    """The architecture fields of a LLaDA config.json, under LLaDA's own names."""
    d_model: int
    n_heads: int
    n_layers: int
    mlp_hidden_size: int               # SiLU-gated MLP width (hub: 12288 = 3 x 4096)
    vocab_size: int                    # embedding rows and logits (config `embedding_size` when set)
    n_kv_heads: int | None = None      # None: n_heads (LLaDA-8B has no grouped-query attention)
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_sequence_length: int = 4096
    weight_tying: bool = False         # output layer = wte (LLaDA-8B: untied)
    mask_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        kv = self.n_kv_heads or self.n_heads
        if self.d_model % self.n_heads or self.n_heads % kv or (self.d_model // self.n_heads) % 2:
            raise ValueError(f"d_model {self.d_model}, n_heads {self.n_heads}, n_kv_heads {kv}: d_model must split "
                             "into heads of even size and n_heads must be a multiple of n_kv_heads")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    def forward_flops(self, batch: int, queries: int, keys: int, logits: int) -> int:
        """Multiply-add FLOPs (x2) of one forward: `queries` positions per row through every layer, attending over
        `keys` positions, and the output layer at `logits` positions per row. Element-wise work is left out."""
        d, kv_dim, h = self.d_model, self.kv_heads * self.head_dim, self.mlp_hidden_size
        per_token = 2 * (2 * d * d + 2 * d * kv_dim + 3 * d * h)            # q, out; k, v; gate, up, down
        attention = 2 * 2 * keys * d                                         # scores and weighted values
        return batch * (self.n_layers * queries * (per_token + attention) + logits * 2 * d * self.vocab_size)

    @classmethod
    def from_hub(cls, raw: dict) -> "LLaDAConfig":
        """From a LLaDA config.json dict; ValueError naming the field for variants this model does not implement."""
        for key, want in _FIXED_FIELDS.items():
            if raw.get(key, want) != want:
                raise ValueError(f"config.json has {key}={raw[key]!r}; learn2pd's LLaDA implements {key}={want!r} "
                                 "(the published LLaDA checkpoints' value)")
        try:
            d = raw["d_model"]
            hidden = raw.get("mlp_hidden_size") or raw.get("mlp_ratio", 4) * d
            kv = 1 if raw.get("multi_query_attention") else raw.get("n_kv_heads")
            return cls(d_model=d, n_heads=raw["n_heads"], n_layers=raw["n_layers"], mlp_hidden_size=hidden,
                       vocab_size=raw.get("embedding_size") or raw["vocab_size"], n_kv_heads=kv,
                       rms_norm_eps=raw.get("rms_norm_eps", 1e-5), rope_theta=raw.get("rope_theta", 10000.0),
                       max_sequence_length=raw.get("max_sequence_length", 4096),
                       weight_tying=bool(raw.get("weight_tying", False)), mask_token_id=raw.get("mask_token_id"),
                       eos_token_id=raw.get("eos_token_id"), pad_token_id=raw.get("pad_token_id"))
        except KeyError as e:
            raise ValueError(f"config.json lacks the field {e.args[0]!r} that every LLaDA config has") from None

    def to_hub(self) -> dict:
        """A config.json dict in LLaDA's field names (the fixed fields included), loadable by `from_hub`."""
        own = asdict(self)
        own["embedding_size"] = own["vocab_size"]
        own["n_kv_heads"] = self.kv_heads
        return {"model_type": MODEL_TYPE, "architectures": ["LLaDAModelLM"], **_FIXED_FIELDS, **own}


class RMSNorm(nn.Module):
    """weight * x / rms(x): normalised in (at least) float32, cast back to the input dtype, then scaled (as LLaDA)."""

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        y = x.to(torch.promote_types(x.dtype, torch.float32))
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.to(x.dtype) * self.weight


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions [B, T] counted from each row's first real token (0 on the left padding, which is never attended):
    a left-padded row then sees exactly the angles of the row alone."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def rotary_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, 1, T, head_dim] in float32 for positions [B, T]: half-split (NeoX) layout, table [f, f]."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    freqs = positions.float()[..., None] * inv_freq                       # [B, T, hd/2]
    angles = torch.cat([freqs, freqs], dim=-1)[:, None]                   # [B, 1, T, hd]
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, T, hd] in (at least) float32 (LLaDA's rope_full_precision), back in x's dtype."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


class LLaDABlock(nn.Module):
    def __init__(self, c: LLaDAConfig):
        super().__init__()
        d, kv_dim, h = c.d_model, c.kv_heads * c.head_dim, c.mlp_hidden_size
        self.n_heads, self.kv_heads, self.head_dim = c.n_heads, c.kv_heads, c.head_dim
        self.attn_norm, self.ff_norm = RMSNorm(d, c.rms_norm_eps), RMSNorm(d, c.rms_norm_eps)
        self.q_proj, self.attn_out = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
        self.k_proj, self.v_proj = nn.Linear(d, kv_dim, bias=False), nn.Linear(d, kv_dim, bias=False)
        self.ff_proj, self.up_proj = nn.Linear(d, h, bias=False), nn.Linear(d, h, bias=False)
        self.ff_out = nn.Linear(h, d, bias=False)

    def forward(self, x, cos, sin, key_mask, cache, write_at):
        B, T, _ = x.shape                                                  # x [B, T, d]
        u = self.attn_norm(x)
        q = self.q_proj(u).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)    # [B, H, T, hd]
        k = self.k_proj(u).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)   # [B, Hkv, T, hd]
        v = self.v_proj(u).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        kv = (k, v)                                                        # this forward's keys/values, rotated
        if cache is not None:   # own keys into the cache, then attend over all of it: [B, Hkv, Tk, hd]
            cache[0].scatter_(2, write_at, k)
            cache[1].scatter_(2, write_at, v)
            k, v = cache
        if self.kv_heads != self.n_heads:
            k, v = (t.repeat_interleave(self.n_heads // self.kv_heads, dim=1) for t in (k, v))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)   # bidirectional: no causal mask
        x = x + self.attn_out(a.transpose(1, 2).reshape(B, T, -1))
        u = self.ff_norm(x)
        x = x + self.ff_out(F.silu(self.ff_proj(u)) * self.up_proj(u))
        return x, kv


@dataclass
class LLaDAOutput:
    logits: torch.Tensor                                      # [B, T or K, V]
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer (k, v) [B, Hkv, T, hd], if asked


class LLaDA(nn.Module):
    """LLaDA's mask predictor. Parameter names equal the hub checkpoints' (`model.transformer.*`)."""

    def __init__(self, config: LLaDAConfig):
        super().__init__()
        self.config = c = config
        tree = nn.ModuleDict({"wte": nn.Embedding(c.vocab_size, c.d_model),
                              "blocks": nn.ModuleList(LLaDABlock(c) for _ in range(c.n_layers)),
                              "ln_f": RMSNorm(c.d_model, c.rms_norm_eps)})
        if not c.weight_tying:
            tree["ff_out"] = nn.Linear(c.d_model, c.vocab_size, bias=False)
        # The same module tree as LLaDA's checkpoints (LLaDAModelLM.model.transformer), so loading is a name match.
        self.model = nn.Module()
        self.model.transformer = tree

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, logits_at: torch.Tensor | None = None,
                return_kv: bool = False, kv_cache=None, write_at: torch.Tensor | None = None) -> LLaDAOutput:
        """input_ids [B, T]; attention_mask [B, Tk] bool/0-1 over the keys (None: all); positions [B, T]
        (None: 0..T-1); logits_at [B, K] positions within input_ids whose logits to return (None: all T).
        kv_cache: per layer (k, v) [B, Hkv, Tk, hd], keys/values of every key position from earlier forwards;
        this forward writes its own into them in place at write_at [B, T] (key indices) and attends over all Tk."""
        t = self.model.transformer
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        cos, sin = rotary_tables(positions, self.config.head_dim, self.config.rope_theta)
        key_mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]   # [B, 1, 1, Tk]
        if kv_cache is not None:
            write_at = write_at[:, None, :, None].expand(B, self.config.kv_heads, T, self.config.head_dim)
        x = t.wte(input_ids)                                               # [B, T, d]
        kv = []
        for i, block in enumerate(t.blocks):
            x, layer_kv = block(x, cos, sin, key_mask, kv_cache[i] if kv_cache is not None else None, write_at)
            kv.append(layer_kv)
        if logits_at is not None:                                          # only the rows' read positions
            x = x.gather(1, logits_at[..., None].expand(-1, -1, x.shape[-1]))   # [B, K, d]
        x = t.ln_f(x)
        logits = x @ (t.wte.weight if self.config.weight_tying else t.ff_out.weight).T   # [B, K, V]
        return LLaDAOutput(logits, kv if return_kv else None)

    def init_weights(self, generator: torch.Generator | None = None, std: float | None = None):
        """Random initialisation for training from scratch: normal(0, d_model^-0.5) linear and embedding weights,
        residual outputs scaled by 1/sqrt(2 n_layers), norm weights 1."""
        std = std or self.config.d_model ** -0.5
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("norm.weight") or name.endswith("ln_f.weight"):
                    p.fill_(1.0)
                else:   # a block's two residual outputs: attn_out and its own ff_out (not the output layer)
                    residual = ".blocks." in name and name.endswith(("attn_out.weight", "ff_out.weight"))
                    p.normal_(0.0, std * ((2 * self.config.n_layers) ** -0.5 if residual else 1.0), generator=generator)
        return self


# ---- loading and saving in the hub layout ---------------------------------------------------------------------

def shard_files(path: Path) -> list[Path]:
    """The checkpoint's safetensors files: those the index names (sharded) or model.safetensors."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError):
            raise ModelLoadError(f"{index} is not a safetensors index (no weight_map); re-download it") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise ModelLoadError(f"{path}: {INDEX_FILE} names {missing[0]}, which is not in the folder"
                                 f"{f' ({len(missing)} shards missing)' if len(missing) > 1 else ''}; download the "
                                 "missing shards into it")
        return [path / f for f in files]
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    found = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.safetensors"))
    raise ModelLoadError(f"{path} has no {SINGLE_FILE} or {INDEX_FILE}{f' (found {found[0]})' if found else ''}; "
                         "LLaDA weights are read from safetensors: download the checkpoint's .safetensors files")


def load_llada(path: Path, config: LLaDAConfig, device: torch.device, dtype: torch.dtype) -> LLaDA:
    """Build the model on the meta device and assign each tensor straight from the memory-mapped shards, converted
    to `dtype` on `device` one shard at a time: no float32 copy of bf16 weights, no build-then-copy."""
    from safetensors import safe_open

    with torch.device("meta"):
        model = LLaDA(config)
    expected = {name: p.shape for name, p in model.state_dict().items()}
    seen: dict[str, str] = {}
    for shard in shard_files(path):
        state = {}
        with safe_open(str(shard), framework="pt", device=str(device)) as f:
            for name in f.keys():
                if name not in expected:
                    raise ModelLoadError(f"{shard} holds tensor {name!r}, which is no LLaDA parameter for this "
                                         "config.json; the shards and the config belong to different models")
                shape = tuple(f.get_slice(name).get_shape())
                if shape != tuple(expected[name]):
                    raise ModelLoadError(f"{shard}: tensor {name} has shape {list(shape)} but config.json implies "
                                         f"{list(expected[name])}; the shards and the config belong to different models")
                state[name] = f.get_tensor(name).to(dtype)
                seen[name] = shard.name
        model.load_state_dict(state, strict=False, assign=True)
    missing = [n for n in expected if n not in seen]
    if missing:
        raise ModelLoadError(f"{path}: tensor {missing[0]} is in none of the shards"
                             f"{f' ({len(missing)} tensors missing)' if len(missing) > 1 else ''}; the checkpoint "
                             "is incomplete: download it again")
    return model.eval().requires_grad_(False)


def save_llada(model: LLaDA, path: str | Path) -> None:
    """config.json + model.safetensors in LLaDA's hub layout (what `load_llada` and `load_model` read)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(model.config.to_hub(), indent=2) + "\n")
    state = {n: p.detach().contiguous().cpu() for n, p in model.state_dict().items()}
    save_file(state, str(path / SINGLE_FILE), metadata={"format": "pt"})

