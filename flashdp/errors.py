"""flashdp's exceptions: each message names the module or parameter at fault and the fix."""

from __future__ import annotations

__all__ = ["FallbackWarning", "FlashDPError", "ModelChangedError", "UnsupportedModuleError"]


class FlashDPError(RuntimeError):
    """Base class of flashdp's errors."""


class UnsupportedModuleError(FlashDPError, ValueError):
    """The model has trainable parameters in modules flashdp cannot clip per sample.

    Attributes:
        modules: ``[(path, class name, [parameter names])]`` of every offending module.
    """

    def __init__(self, modules: list[tuple[str, str, list[str]]], supported: list[str] | None = None):
        self.modules = modules
        lines = [f"  - {path or '<root>'} ({cls}): trainable {', '.join(names)}" for path, cls, names in modules]
        listed = f" Supported (flashdp's layer registry): {'; '.join(supported)}." if supported else ""
        super().__init__(
            "flashdp.make_private: these modules have trainable parameters that flashdp cannot clip per sample:\n"
            + "\n".join(lines)
            + "\nFix: freeze them (`p.requires_grad_(False)` for each parameter listed), or register a DP "
            "implementation with `@flashdp.register_layer(ModuleClass)` (docs/flashdp.md, \"Adding a layer\")."
            + listed
        )


class ModelChangedError(FlashDPError):
    """The model's trainable parameters differ from those seen by ``make_private``."""


class FallbackWarning(UserWarning):
    """``make_private`` clips some modules with the generic fallback (slower, B × numel memory); names them."""
