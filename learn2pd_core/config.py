"""DecodeConfig: every decoding setting in one dataclass, validated once at construction.

Settings only: it reads no file and holds no per-request data. The learned filter (an object) and EGP's reference
answers (one per prompt) are passed to `generate` with the prompts. Its field defaults are the project's defaults:
the jobs' command-line defaults read them from `DEFAULTS`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .errors import ConfigError

POLICIES = ("vanilla", "threshold", "factor", "egp", "learn2pd")
# "block" (default): once the block in which an end-of-text token was committed is complete, cut after the first
#   end-of-text: every later block is skipped and the answer is token for token the one decoding without EoTP gives;
# "commit": the paper's EoTP (cut right after a committed end-of-text, mid-block: the block's remaining positions
#   are then predicted over a shorter sequence, which changes answers);
# "predict": the official code's variant (truncate at the most confident *predicted* end-of-text).
EOTP_MODES = ("block", "commit", "predict")
# τ when none is given: Fast-dLLM's 0.9 for `threshold`; for `learn2pd` the filter's sidecar says (0.96 for the
# paper's filter, 0.99 for the context filter), and a filter without one gets the paper's 0.96.
DEFAULT_THRESHOLD = {"threshold": 0.9, "learn2pd": 0.96}
# KV cache (Fast-dLLM's, as in the paper): "prefix" reuses the keys/values before the block, "dual" also those
# after it. "block" refreshes them at each block's first step; "step" at every step (exact: a check, no speed-up).
CACHE_MODES = ("prefix", "dual")
CACHE_REFRESH = ("block", "step")
# A method name's suffixes and the setting each one stands for ('learn2pd+eotp+dual@0.9').
METHOD_SUFFIXES = {"eotp": ("eotp", "block"), "eotp-commit": ("eotp", "commit"), "eotp-predict": ("eotp", "predict"),
                   "prefix": ("cache", "prefix"), "dual": ("cache", "dual"), "captured": ("capture", True)}


@dataclass
class DecodeConfig:
    gen_length: int = 256
    block_size: int = 32
    steps: int | None = None          # vanilla/learn2pd top-k schedule; None = gen_length (one token per step)
    temperature: float = 0.0          # 0 = greedy; > 0 = Gumbel-max sampling in float64 (as LLaDA)
    policy: str = "vanilla"
    threshold: float | None = None    # τ: threshold policy (0.9) or learn2pd filter (sidecar value, else 0.96)
    factor: float = 1.0               # f of Fast-dLLM's factor rule
    eotp: str | None = None           # None, "block", "commit" or "predict" (True means "block")
    seed: int = 0
    cache: str | None = None          # None, "prefix" or "dual" (LLaDA checkpoints only)
    cache_refresh: str = "block"      # "block" (Fast-dLLM) or "step" (exact; for checking the cached path)
    capture: bool = False             # dual cache: compile its block step at bucketed shapes (forward.py)

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ConfigError(f"unknown policy {self.policy!r}; choose one of {', '.join(POLICIES)}")
        if self.gen_length <= 0 or self.block_size <= 0:
            raise ConfigError(f"gen_length ({self.gen_length}) and block_size ({self.block_size}) must be positive")
        if self.gen_length % self.block_size:
            raise ConfigError(f"gen_length {self.gen_length} is not a multiple of block_size {self.block_size}; "
                              f"use e.g. gen_length={self.block_size * max(1, round(self.gen_length / self.block_size))}")
        if self.steps is None:
            self.steps = self.gen_length
        if not (self.num_blocks <= self.steps <= self.gen_length) or self.steps % self.num_blocks:
            raise ConfigError(f"steps {self.steps} must be a multiple of the number of blocks ({self.num_blocks}) "
                              f"between {self.num_blocks} and gen_length {self.gen_length}")
        if self.temperature < 0:
            raise ConfigError(f"temperature {self.temperature} must be >= 0 (0 is greedy)")
        if self.eotp is True:
            self.eotp = "block"
        if self.eotp is False:
            self.eotp = None
        if self.eotp is not None and self.eotp not in EOTP_MODES:
            raise ConfigError(f"unknown eotp mode {self.eotp!r}; choose None, 'block' (default), 'commit' (paper) or "
                              "'predict' (official code)")
        if self.cache is not None and self.cache not in CACHE_MODES:
            raise ConfigError(f"unknown cache {self.cache!r}; choose None, 'prefix' or 'dual'")
        if self.cache_refresh not in CACHE_REFRESH:
            raise ConfigError(f"unknown cache_refresh {self.cache_refresh!r}; choose 'block' (default) or 'step'")
        if self.capture and (self.cache != "dual" or self.cache_refresh != "block"):
            raise ConfigError("capture compiles the dual cache's block step: use it with cache='dual' and "
                              "cache_refresh='block'")
        if self.factor <= 0:
            raise ConfigError(f"factor {self.factor} must be > 0 (Fast-dLLM default 1.0)")
        self._check_threshold()

    def _check_threshold(self):
        if self.threshold is None:
            return
        # A confidence never exceeds 1, so τ > 1 is meaningless for `threshold`; for `learn2pd` it is the
        # explicit "filter never fires" ablation (decoding falls back to the vanilla top-k).
        upper = float("inf") if self.policy == "learn2pd" else 1.0
        if not (0.0 <= self.threshold <= upper):
            raise ConfigError(f"threshold {self.threshold} must be in [0, 1] (typical: 0.9 for threshold, 0.96 for learn2pd)")

    def check_filter(self, filter) -> None:
        """learn2pd needs a filter of this block size; raises the one-line ConfigError."""
        if self.policy != "learn2pd":
            return
        if filter is None:
            raise ConfigError("policy 'learn2pd' needs a filter: pass filter=load_filter(<its directory>) "
                              "(train one with jobs/train_filter.py)")
        if filter.block_size != self.block_size:
            raise ConfigError(f"filter was trained for block_size {filter.block_size} but decoding uses "
                              f"block_size {self.block_size}; pass --block-size {filter.block_size} or train a new filter")

    def check_references(self, references: Sequence[Sequence[int]] | None, prompts: int) -> None:
        """egp needs one gen_length reference answer per prompt; raises the one-line ConfigError."""
        if self.policy != "egp":
            return
        if references is None:
            raise ConfigError("policy 'egp' needs references: one reference answer (gen_length token ids) per "
                              "prompt, e.g. the token_ids of a vanilla greedy run")
        if len(references) != prompts:
            raise ConfigError(f"egp got {len(references)} references for {prompts} prompts; pass one per prompt")
        for i, ref in enumerate(references):
            if len(ref) != self.gen_length:
                raise ConfigError(f"reference {i} has {len(ref)} tokens, expected gen_length={self.gen_length}")

    @classmethod
    def from_method(cls, method: str, **settings) -> "DecodeConfig":
        """Config for a method name as used on command lines: a policy, then optionally '+eotp' (block),
        '+eotp-commit' or '+eotp-predict', '+prefix' or '+dual' (KV cache), '+captured' (dual: the compiled step) and
        '@τ' (e.g. 'learn2pd+eotp+dual@0.9', 'threshold+prefix', 'threshold@0.7'); `settings` supply the rest
        (gen_length, block_size, ...)."""
        name, _, tau = method.partition("@")
        policy, *suffixes = name.split("+")
        chosen = {}
        for suffix in suffixes:
            key, value = METHOD_SUFFIXES.get(suffix, (None, None))
            if key is None or key in chosen:
                raise ConfigError(f"unknown method {method!r}: use a policy ({', '.join(POLICIES)}) optionally followed "
                                  "by +eotp, +eotp-commit or +eotp-predict, by +prefix or +dual (+captured), and by "
                                  "@<threshold>")
            chosen[key] = value
        if tau:
            try:
                settings = {**settings, "threshold": float(tau)}
            except ValueError:
                raise ConfigError(f"method {method!r}: {tau!r} after '@' is not a threshold; write e.g. "
                                  f"{name}@0.9") from None
        return cls(policy=policy, **{**settings, **chosen})

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_size

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks

    @property
    def method(self) -> str:
        """The canonical method name, which from_method parses back to this config: the policy, its EoTP mode, its
        cache (and +captured), then @τ when one is set ('threshold+eotp+dual@0.7')."""
        suffix = {setting: name for name, setting in METHOD_SUFFIXES.items()}
        parts = [self.policy] + [suffix[(key, value)] for key, value in (("eotp", self.eotp), ("cache", self.cache),
                                                                               ("capture", self.capture)) if value]
        return "+".join(parts) + (f"@{self.threshold:g}" if self.threshold is not None else "")

    def tau(self, filter=None) -> float | None:
        """The threshold in force: the config's, else for learn2pd the filter's sidecar value, else the policy's
        default; None for policies without one."""
        if self.policy not in DEFAULT_THRESHOLD:
            return None
        if self.threshold is not None:
            return self.threshold
        if self.policy == "learn2pd" and getattr(filter, "threshold", None) is not None:
            return filter.threshold
        return DEFAULT_THRESHOLD[self.policy]

    def settings(self, filter=None) -> dict:
        """JSON-friendly summary for manifests and sidecars."""
        return {"gen_length": self.gen_length, "block_size": self.block_size, "steps": self.steps,
                "temperature": self.temperature, "policy": self.policy, "threshold": self.tau(filter),
                "factor": self.factor, "eotp": self.eotp, "seed": self.seed, "cache": self.cache}


DEFAULTS = DecodeConfig()   # the defaults every job's arguments read
