"""The package's import graph, read from the source with `ast` (nothing is imported): no cycle
among the imports that run when a module loads, and the model, the objectives and retrieval free
of TensorFlow, directly (at any level) or through what they load."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "imagebert_jax"
TF = ("tensorflow", "tensorflow_datasets")
TF_FREE = ("imagebert_jax.model", "imagebert_jax.objectives", "imagebert_jax.retrieval")


def _modules() -> dict[str, str]:
  """{dotted module name: path} for every module of the package."""
  found = {}
  for folder, _, files in os.walk(os.path.join(ROOT, PACKAGE)):
    for f in files:
      if f.endswith(".py"):
        rel = os.path.relpath(os.path.join(folder, f), ROOT)[:-3].split(os.sep)
        if rel[-1] == "__init__":
          rel = rel[:-1]
        found[".".join(rel)] = os.path.join(folder, f)
  return found


MODULES = _modules()


def _imports(name: str) -> tuple[set[str], set[str]]:
  """(imports run when the module loads, imports anywhere in it): dotted names, `from a import
  b` giving a.b when that is a module of the package and a otherwise."""
  with open(MODULES[name]) as f:
    tree = ast.parse(f.read())
  package = name if MODULES[name].endswith("__init__.py") else name.rpartition(".")[0]

  def targets(node) -> list[str]:
    if isinstance(node, ast.Import):
      return [a.name for a in node.names]
    base = node.module or ""
    if node.level:  # relative: from the module's package upwards
      parts = package.split(".")
      base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]

  at_load, anywhere = set(), set()

  def visit(node, in_function: bool) -> None:
    for child in ast.iter_child_nodes(node):
      if isinstance(child, (ast.Import, ast.ImportFrom)):
        if isinstance(child, ast.ImportFrom) and child.module == "__future__":
          continue
        for t in targets(child):
          anywhere.add(t)
          if not in_function:
            at_load.add(t)
      visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                     ast.Lambda)))

  visit(tree, False)
  return at_load, anywhere


IMPORTS = {name: _imports(name) for name in MODULES}


def _loads(name: str, parents: bool = True) -> set[str]:
  """The package modules that loading `name` loads: its imports at load time (with `parents`,
  the packages above each too: Python runs their __init__ first), transitively."""
  seen, todo = set(), [name]
  while todo:
    m = todo.pop()
    for t in IMPORTS[m][0]:
      parts = t.split(".")
      for i in range(1 if parents else len(parts), len(parts) + 1):
        dotted = ".".join(parts[:i])
        if dotted in MODULES and dotted not in seen:
          seen.add(dotted)
          todo.append(dotted)
  return seen


def _is_tf(target: str) -> bool:
  return target.split(".")[0] in TF


def test_the_graph_is_read():
  # A hand-checked sample, so an empty graph cannot pass the tests below.
  assert "imagebert_jax.model.imagebert" in MODULES
  assert "imagebert_jax.model.encoder" in _loads("imagebert_jax.model.imagebert")
  assert "imagebert_jax.retrieval.evaluate" in _loads("imagebert_jax.training.evaluators")
  assert any(_is_tf(t) for t in IMPORTS["imagebert_jax.data.pipeline"][1])


def test_no_import_cycle():
  """No module imports itself back through its load-time imports (a package's __init__ runs
  before its modules load, so a module reaching its own package is not a cycle; a package whose
  __init__ imports a module that imports the package by name is)."""
  cycles = []
  for name in MODULES:
    for other in {t for t in IMPORTS[name][0] if t in MODULES}:
      if name in _loads(other, parents=False):
        cycles.append(f"{name} -> {other} -> ... -> {name}")
  assert not cycles, "import cycles:\n" + "\n".join(sorted(cycles))


def test_model_objectives_and_retrieval_are_free_of_tensorflow():
  """They never import TensorFlow, even inside a function, and nothing they load at import time
  does so when it loads; reading a built dataset is the data package's (data.splits)."""
  problems = []
  for name in MODULES:
    if not name.startswith(TF_FREE):
      continue
    problems += [f"{name} imports {t}" for t in IMPORTS[name][1] if _is_tf(t)]
    for loaded in _loads(name):
      problems += [f"{name} loads {loaded}, which imports {t} when it loads"
                   for t in IMPORTS[loaded][0] if _is_tf(t)]
  assert not problems, "\n".join(problems)
