"""Named targets, their build pipeline, schedules and export (cross-compilation)."""

# This folder is installed as mbcompile.targets (pyproject.toml, package-dir). Imported under
# another name (``import targets`` from the repository root) it would load second copies of the
# target table and the schedules.
if __name__ != "mbcompile.targets":
    raise ImportError(
        f"import mbcompile.targets, not {__name__}: the targets/ folder is installed as "
        "mbcompile.targets, and a second name would load a second target registry. Install the "
        "project (pip install -e .) and write `from mbcompile.targets import ...`."
    )
