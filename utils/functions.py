"""Resolve the `module.path@ClassName` identifiers used in Hydra configs (e.g. `arch.name`)."""

import importlib
import inspect


def _split_identifier(identifier: str) -> tuple[str, str]:
    module_path, sep, class_name = identifier.partition("@")
    if not sep or not module_path or not class_name or "@" in class_name:
        raise ValueError(f"model identifier {identifier!r}: expected the form 'module.path@ClassName'")
    return module_path, class_name


def _import(identifier: str, prefix: str):
    module_path, class_name = _split_identifier(identifier)
    try:
        return importlib.import_module(prefix + module_path), class_name
    except ModuleNotFoundError as e:
        raise ValueError(
            f"model identifier {identifier!r}: cannot import module {prefix + module_path!r} ({e})"
        ) from None


def load_model_class(identifier: str, prefix: str = "models."):
    """`load_model_class("hrm.hrm_act_v1@HierarchicalReasoningModel_ACTV1")` -> the class object."""
    module, class_name = _import(identifier, prefix)
    try:
        return getattr(module, class_name)
    except AttributeError:
        raise ValueError(f"model identifier {identifier!r}: module {module.__name__!r} has no {class_name!r}") from None


def get_model_source_path(identifier: str, prefix: str = "models.") -> str:
    """Path of the source file defining the identified class (copied beside checkpoints)."""
    module, _ = _import(identifier, prefix)
    return inspect.getsourcefile(module)
