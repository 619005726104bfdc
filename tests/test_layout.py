"""The package's shape is part of its contract: stages import one way, only models name families,
every public name is documented, the configuration schema agrees with conf/, one `demixlab` command."""
import ast
import dataclasses
import importlib
import typing as tp
from pathlib import Path

import pytest
import yaml

import demixlab
from demixlab.commands import COMMANDS, build_parser
from demixlab.experiment import CONFIG_DIR
from demixlab.models import family_names, import_formats
from demixlab.training.config import TrainingConfig

PACKAGE = Path(demixlab.__file__).parent
# What each part of the package may import from demixlab (besides itself). Base modules first;
# every stage imports only stages listed before it.
BASE = {"errors", "files", "audio", "experiment", "threads", "__version__"}
ALLOWED = {
    "errors": set(),
    "threads": set(),
    "files": {"errors"},
    "audio": {"errors", "files"},
    "experiment": {"errors"},
    "spectral": {"errors", "files", "threads"},
    "models": BASE | {"spectral"},
    "data": BASE,
    "release": BASE | {"models", "spectral"},
    "separation": BASE | {"models", "spectral", "release"},
    "evaluation": BASE | {"data"},
    "training": BASE | {"spectral", "models", "data", "release", "separation", "evaluation"},
    "train": BASE | {"training"},
    "commands": BASE | {"spectral", "models", "data", "release", "separation", "evaluation", "training", "train"},
    "__main__": {"commands"},
}


def _modules() -> tp.Iterator[tp.Tuple[Path, str]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        yield path, ".".join(("demixlab",) + parts)


def _demixlab_imports(path: Path, module: str) -> tp.Set[str]:
    """Every demixlab module or name `path` imports, as absolute dotted names."""
    package = module.rsplit(".", 1)[0] if not module.endswith(".__init__") else module[: -len(".__init__")]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names |= {f"{target}.{alias.name}" for alias in node.names} if not node.module else {target}
        elif isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
    return {name for name in names if name.startswith("demixlab.")}


def _part(module: str) -> str:
    return module.split(".")[1]


def test_stages_import_one_way():
    wrong = []
    for path, module in _modules():
        part = _part(module)
        for target in _demixlab_imports(path, module):
            other = _part(target)
            if other != part and other not in ALLOWED[part]:
                wrong.append(f"{module} imports {target}")
    assert wrong == []


def _code_strings(path: Path) -> tp.Iterator[tp.Tuple[int, str]]:
    """String constants of a module that are not docstrings."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.lineno, node.value


def test_only_the_models_package_names_families_and_import_formats():
    names = set(family_names()) | set(import_formats())
    found = [f"{path.relative_to(PACKAGE)}:{line} {text!r}" for path, module in _modules()
             if _part(module) != "models" for line, text in _code_strings(path)
             if any(name in text.replace(",", " ").split() for name in names)]
    assert found == []


def test_a_handful_of_top_level_modules_and_no_module_over_600_lines():
    top_level = sorted(path.name for path in PACKAGE.glob("*.py"))
    assert len(top_level) <= 8, top_level
    long = [f"{path.relative_to(PACKAGE)}: {len(path.read_text().splitlines())}" for path, _ in _modules()
            if len(path.read_text().splitlines()) > 600]
    assert long == []


def test_every_module_and_public_class_and_function_has_a_docstring():
    missing = []
    for path, module in _modules():
        tree = ast.parse(path.read_text())
        if not ast.get_docstring(tree):
            missing.append(module)

        def visit(node: ast.AST, prefix: str, in_class: bool) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    public = not child.name.startswith("_") and not (in_class and child.name == "forward")
                    if public and not ast.get_docstring(child):
                        missing.append(f"{module}.{prefix}{child.name}")
                    if isinstance(child, ast.ClassDef):
                        visit(child, f"{prefix}{child.name}.", True)

        visit(tree, "", False)
    assert missing == []


def _schema_defaults(cls: tp.Any, prefix: str = "") -> tp.Dict[str, tp.Any]:
    values = {}
    for item in dataclasses.fields(cls):
        if item.default_factory is not dataclasses.MISSING:
            default = item.default_factory()
        else:
            default = item.default
        if dataclasses.is_dataclass(default):
            values.update(_schema_defaults(type(default), f"{prefix}{item.name}."))
        else:
            values[f"{prefix}{item.name}"] = default
    return values


def _yaml_values(node: tp.Any, prefix: str = "") -> tp.Dict[str, tp.Any]:
    if isinstance(node, dict) and node:
        return {key: value for name, child in node.items() for key, value in _yaml_values(child, f"{prefix}{name}.").items()}
    return {prefix.rstrip("."): node}


def test_the_schema_defaults_are_the_base_configuration():
    base = yaml.safe_load((CONFIG_DIR / "config.yaml").read_text())
    base.pop("defaults")
    declared = _yaml_values(base)
    schema = _schema_defaults(TrainingConfig)
    for key, value in declared.items():
        if key.split(".")[0] in ("dora", "slurm", "loss", "optim") and key not in schema:
            continue  # Dora's sections and the empty mappings the families fill in
        assert key in schema, f"{key} is in config.yaml but not in the schema"
        assert schema[key] == value, f"{key}: schema default {schema[key]!r}, config.yaml {value!r}"


def test_one_command_lists_every_verb():
    parser = build_parser()
    help_text = parser.format_help()
    for verb in ("separate", "export", "import", "evaluate", "plot-slicqt", "grid-local", "compare", "search", "blend",
                 "automix"):
        assert verb in COMMANDS and verb in help_text
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["export", "--help"])
    assert exit_info.value.code == 0


def test_the_readme_documents_every_verb():
    readme = (PACKAGE.parent / "README.md").read_text()
    assert [verb for verb in COMMANDS if f"demixlab {verb}" not in readme] == []


@pytest.mark.parametrize("shim", ["export", "import_model", "test_pretrained", "plot_slicqt", "grid_local"])
def test_the_tools_modules_still_run_the_commands(shim, capsys):
    module = importlib.import_module(f"tools.{shim}")
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0 and "usage: demixlab" in capsys.readouterr().out
