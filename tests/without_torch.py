"""pytest plugin (`python -m pytest -p tests.without_torch`): make torch look uninstalled, as on a machine without it.

Every import finder is wrapped so that it finds nothing named torch: `import torch` raises
ModuleNotFoundError, importlib.util.find_spec("torch") returns None (what transformers' is_torch_available()
checks) and "torch" never enters sys.modules (which datasets' pickler looks at).
"""
import sys


class _WithoutTorch:
    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            return None
        find_spec = getattr(self.finder, "find_spec", None)
        return find_spec(name, path, target) if find_spec is not None else None

    def __getattr__(self, attribute):
        return getattr(self.finder, attribute)


assert "torch" not in sys.modules, "torch was imported before tests.without_torch"
sys.meta_path[:] = [_WithoutTorch(finder) for finder in sys.meta_path]
