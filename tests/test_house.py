"""The house rules, checked: libraries never import entry points; one source of defaults;
no docstring or comment points outside the repository."""

import ast
import dataclasses
import os


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBRARIES = ("core", "model", "parallel", "data", "training", "serving", "configs")
ENTRY_POINTS = ("train", "serve", "tools", "bench", "cli")


def python_files(*folders):
  for folder in folders:
    for directory, _, names in os.walk(os.path.join(ROOT, folder)):
      yield from (os.path.join(directory, n) for n in sorted(names) if n.endswith(".py"))


def imported_modules(path):
  """Every module an import statement of `path` names (at any depth, lazy ones too)."""
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      yield from (alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      yield node.module
      yield from (f"{node.module}.{alias.name}" for alias in node.names)


def test_no_library_imports_an_entry_point():
  offences = [f"{os.path.relpath(path, ROOT)} imports {module}"
              for path in python_files(*LIBRARIES) for module in imported_modules(path)
              if module.split(".")[0] in ENTRY_POINTS]
  assert not offences, "\n".join(offences)


# The layers of docs/design.md, "Architecture": what each package may import of ringlm.
LAYERS = {"core": set(), "data": set(), "parallel": {"core"}, "model": {"core", "parallel"},
          "training": {"core", "parallel", "model", "data"},
          "serving": {"core", "parallel", "model", "data"}, "configs": {"model"},
          "cli": {"core", "parallel"}}


def test_every_package_imports_only_the_layers_below_it():
  own = set(LAYERS) | set(ENTRY_POINTS)
  offences = [f"{os.path.relpath(path, ROOT)} imports {module}"
              for package, allowed in LAYERS.items() for path in python_files(package)
              for module in imported_modules(path)
              if module.split(".")[0] in own - allowed - {package}]
  assert not offences, "\n".join(offences)


def test_the_import_scan_sees_an_offence(tmp_path):
  """(The scan above can fail: a file that imports serve and tools.x is caught.)"""
  path = tmp_path / "offender.py"
  path.write_text("def f():\n  import serve\n  from tools import evaluation\n")
  assert {"serve", "tools", "tools.evaluation"} <= set(imported_modules(str(path)))


def test_base_config_takes_the_model_defaults_from_the_dataclasses():
  from configs import base
  from model import config as model_config

  def declared(cls):
    return {f.name: declared(type(f.default)) if dataclasses.is_dataclass(f.default)
            else f.default for f in dataclasses.fields(cls)}

  config = base.get_config()
  assert config.model.to_dict() == declared(model_config.ModelConfig)
  assert config.attention.to_dict() == declared(model_config.AttentionConfig)
  # and the config a run resolves from them is the dataclass' own default instance
  assert model_config.ModelConfig.from_dict(config.model.to_dict()) == model_config.ModelConfig()


def test_no_text_points_outside_the_repository():
  offences = []
  for path in python_files(*LIBRARIES, *ENTRY_POINTS, "tests"):
    with open(path) as f:
      for number, line in enumerate(f, 1):
        if "shared/" in line and "DESIGN" in line or "../shared" in line or "DESIGN.md" in line:
          offences.append(f"{os.path.relpath(path, ROOT)}:{number}: {line.strip()}")
  offences = [o for o in offences if not o.startswith("tests/test_house.py")]
  assert not offences, "\n".join(offences)


def test_what_pip_installs_imports_only_what_it_ships():
  """Every ringlm module that a shipped module imports is shipped too (pyproject.toml's
  packages and py-modules), so an installed ringlm works away from the checkout."""
  import tomllib
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    setuptools = tomllib.load(f)["tool"]["setuptools"]
  packages, modules = set(setuptools["packages"]), set(setuptools["py-modules"])
  own = {name[:-3] if name.endswith(".py") else name for name in os.listdir(ROOT)
         if name.endswith(".py") or os.path.isfile(os.path.join(ROOT, name, "__init__.py"))}
  own.discard("tests")
  shipped = [os.path.join(ROOT, *package.split("."), name) for package in packages
             for name in sorted(os.listdir(os.path.join(ROOT, *package.split("."))))
             if name.endswith(".py")] + [os.path.join(ROOT, f"{m}.py") for m in modules]
  missing = set()
  for path in shipped:
    for module in imported_modules(path):
      parts = module.split(".")
      if parts[0] not in own or parts[0] in modules:
        continue
      # the package that holds `module`: the longest prefix that is a package folder
      depth = max(n for n in range(1, len(parts) + 1)
                  if os.path.isfile(os.path.join(ROOT, *parts[:n], "__init__.py")))
      package = ".".join(parts[:depth])
      if package not in packages:
        missing.add(f"{os.path.relpath(path, ROOT)} imports {module}")
  assert not missing, "\n".join(sorted(missing))
  assert {"train", "serve"} <= modules
