"""learn2pd_core: learned parallel decoding for masked diffusion LMs (no Ray in here)."""
from .config import DEFAULTS, DecodeConfig
from .engine import GenerationResult, Trace, generate
from .errors import ConfigError, Learn2PDError, ModelLoadError
from .filter import ContextFilter, FilterMLP, fit_filter, load_filter, make_filter, save_filter
from .model import DiffusionLM, check_model, load_model

__all__ = ["DEFAULTS", "DecodeConfig", "GenerationResult", "Trace", "generate", "ConfigError", "Learn2PDError", "ModelLoadError",
           "ContextFilter", "FilterMLP", "fit_filter", "load_filter", "make_filter", "save_filter", "DiffusionLM", "check_model", "load_model"]
