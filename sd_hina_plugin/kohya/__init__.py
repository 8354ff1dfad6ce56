"""kohya sd-scripts integration: automatic step-log hook, launcher."""

from .hook import attach, install_on_class, unwrap

__all__ = ["attach", "install_on_class", "unwrap"]
