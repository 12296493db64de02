"""`--config run.yaml`: a file whose keys are the command's flag names; flags given win.

Keys may be written as on the command line (`embedding-model`) or in snake case
(`embedding_model`). An unknown key is a usage error that lists the known ones.
"""

from __future__ import annotations

from pathlib import Path



def merge_config(ctx, values: dict, config_path: str | None) -> dict:
    """The command's arguments after the config file: explicit flags override file values."""
    from dyn.core.errors import UsageError

    if not config_path:
        return dict(values)
    data = _load(config_path)
    params = {p.name: p for p in ctx.command.params if p.name and p.name != "config"}
    merged = dict(values)
    for key, raw in data.items():
        name = str(key).replace("-", "_")
        if name not in params:
            known = ", ".join(sorted(n.replace("_", "-") for n in params))
            raise UsageError(f"{config_path}: unknown key '{key}'; known keys: {known}")
        if getattr(ctx.get_parameter_source(name), "name", None) in ("COMMANDLINE", "ENVIRONMENT"):
            continue
        try:
            merged[name] = params[name].process_value(ctx, raw)
        except Exception as exc:  # Typer/Click's BadParameter, whichever Click is underneath
            if type(exc).__module__.split(".")[0] not in ("typer", "click"):
                raise
            raise UsageError(f"{config_path}: key '{key}': {getattr(exc, 'message', exc)}") from None
    return merged


def _load(config_path: str) -> dict:
    import yaml

    from dyn.core.errors import UsageError

    path = Path(config_path)
    if not path.is_file():
        raise UsageError(f"--config {config_path}: no such file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UsageError(f"--config {config_path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise UsageError(f"--config {config_path}: expected a mapping of flag names to values")
    return data
