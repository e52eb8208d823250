"""metagate as a library: train an experiment and read run folders from Python (a script, a notebook).

    import metagate

    results = metagate.run("digits-split", overrides=["method.name=ewc"], out="runs/ewc")
    print(results["acc"], results["acc_matrix"])

    runs = metagate.load_runs("runs")            # every finished run below the folder, as typed records
    rows = [r.row() for r in runs]               # flat dicts: pandas.DataFrame(rows) if you like

``metagate.run`` is ``metagate run`` without the terminal: the same config (a ready config's name, a YAML file, a
dict or a validated config, with dotted overrides), the same run folder, resume and references. Both names are
exported lazily from :mod:`metagate`, so ``import metagate`` stays fast (torch is imported by the first run).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, Union

from metagate import orchestrate
from metagate.aggregate import RunRecord, find_runs
from metagate.config import config_from_dict, load_config
from metagate.schema import ExperimentConfig
from metagate.train import Trainer

__all__ = ["RunRecord", "load_runs", "run"]

ConfigLike = Union[str, Path, Mapping[str, Any], ExperimentConfig, None]


def _config(config: ConfigLike, overrides: Sequence[str]) -> ExperimentConfig:
    if isinstance(config, ExperimentConfig):
        return config_from_dict(config.to_dict(), list(overrides)) if overrides else config
    if isinstance(config, Mapping):
        return config_from_dict(dict(config), list(overrides))
    return load_config(None if config is None else str(config), list(overrides))


def run(
    config: ConfigLike = None, out: str | Path | None = None, *, overrides: Sequence[str] = (), resume: bool = False,
    echo: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train one experiment; returns its results (what ``results.json`` holds: ``acc_matrix``, ``acc``, ``bwt``, ...).

    ``config``: a ready config's name (``metagate list configs``), a YAML file, a dict shaped like the YAML, or an
    :class:`~metagate.schema.ExperimentConfig`; ``None`` is the default experiment. ``overrides``: dotted
    ``key=value`` strings, as on the command line. ``out``: the run folder (the contract of ``metagate run``:
    config, results, metrics, checkpoints, and the config's references in ``out/reference``, ``out/reference-2``,
    ...); ``None`` trains in memory and writes nothing (the references are then not run). ``resume``: continue the
    interrupted run in ``out`` (with ``config=None``, from its own ``config.yaml``). ``echo``: where lines about
    the references go (default: nowhere). Bad input raises the CLI's errors (``ConfigError``, ``RunFolderError``,
    ...), whose message says what to change."""
    if out is None:
        if resume:
            raise orchestrate.ConfigError("resume needs out, the run folder to continue")
        return Trainer(_config(config, overrides)).fit()
    out = Path(out)
    if resume and config is None:
        cfg, out = orchestrate.run_config(None, list(overrides), out, resume=True)
    else:
        cfg = _config(config, overrides)
    return orchestrate.run_with_reference(cfg, out, resume, echo or orchestrate._quiet).results


def load_runs(*folders: str | Path) -> list[RunRecord]:
    """Every finished run at or below ``folders`` (run folders, a compare's, a sweep's, a tune's, ...), as typed
    records (folder, label, config, results), labelled as ``metagate aggregate`` labels its rows;
    ``record.row()`` is one flat dict of a run's scalar figures, for a table. An empty or missing folder
    raises :class:`~metagate.aggregate.AggregationError`."""
    return find_runs([Path(f) for f in folders])
