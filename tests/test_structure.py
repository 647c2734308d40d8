"""The package's structure: no import cycles between growjax modules (each concept has one home and
dependencies point one way), found by reading every module's imports, those inside functions too."""
import ast
import os
import pathlib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def import_graph() -> dict[str, set[str]]:
    """{module: growjax modules it imports}; a module's imports of its parent packages are left out
    (Python runs a package's __init__ first anyway)."""
    paths = {}
    for folder, _, files in os.walk(os.path.join(REPO, 'growjax')):
        for file in files:
            if file.endswith('.py'):
                path = os.path.join(folder, file)
                paths[os.path.relpath(path, REPO)[:-3].replace(os.sep, '.').removesuffix('.__init__')] = path
    graph = {}
    for name, path in paths.items():
        with open(path) as f:
            tree = ast.parse(f.read())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith('growjax'):
                imported |= {node.module} | {f'{node.module}.{alias.name}' for alias in node.names}
            elif isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
        graph[name] = {m for m in imported & set(paths) if m != name and not name.startswith(m + '.')}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}) == [['a', 'b', 'c']]


def test_growjax_has_no_import_cycles():
    graph = import_graph()
    assert {'growjax.train', 'growjax.analysis', 'growjax.analysis.cli', 'growjax.data.tfdata'} <= set(graph)
    assert cycles(graph) == []


def test_the_training_job_does_not_know_the_analyses():
    assert not any(m.startswith('growjax.analysis') for m in import_graph()['growjax.train'])


def test_experiments_are_not_in_the_installed_package():
    """Experiments use the library and live at the top level (`python -m experiments.paper`):
    pyproject.toml's package find installs growjax's packages and nothing of experiments/ or bench/."""
    import tomllib
    import setuptools
    with open(os.path.join(REPO, 'pyproject.toml'), 'rb') as f:
        find = tomllib.load(f)['tool']['setuptools']['packages']['find']
    installed = setuptools.find_packages(REPO, include=find['include'], exclude=find.get('exclude', ()))
    assert 'growjax' in installed and 'growjax.analysis' in installed
    assert all(p == 'growjax' or p.startswith('growjax.') for p in installed), installed
    assert not any('experiments' in p.split('.') for p in installed), installed
    assert os.path.isfile(os.path.join(REPO, 'experiments', 'paper.py'))


def path_literals(tree: ast.AST) -> list[str]:
    """String constants of a module that are a path into docs/ or name results.md (docstrings and
    other bare string statements are prose, not paths, and are left out)."""
    prose = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in prose:
            value = node.value.strip().removeprefix('./')
            if value == 'docs' or value.startswith(('docs/', 'docs' + os.sep)) or value.endswith('results.md'):
                found.append(value)
    return found


def test_path_literals_finds_a_docs_path():
    tree = ast.parse('"""Writes docs/results.md."""\nimport os\nos.path.join("docs", "results.md")\n'
                     'open("./docs/figures/a.png", "w")\nprint("see docs/design.md")\n')
    assert path_literals(tree) == ['docs', 'results.md', 'docs/figures/a.png']


def test_no_library_module_writes_into_docs():
    """The library writes only where it is told (a workdir, a cache); reports into the repository's
    docs/ are the experiments' business."""
    found = {}
    for folder, _, files in os.walk(os.path.join(REPO, 'growjax')):
        for file in files:
            if file.endswith('.py'):
                path = os.path.join(folder, file)
                with open(path) as f:
                    literals = path_literals(ast.parse(f.read()))
                if literals:
                    found[os.path.relpath(path, REPO)] = literals
    assert found == {}


def family_names_in_conditions(path: str, names: set[str]) -> list[str]:
    """'line: text' of every condition (if, while, assert, comparison, boolean, startswith/endswith)
    in the module at `path` that mentions a model name, or a prefix of one, as a string; and of any
    attribute named after one (config.model.vit)."""
    with open(path) as f:
        source = f.read()
    tree = ast.parse(source)

    def mentions(node) -> bool:
        return any(isinstance(n, ast.Constant) and isinstance(n.value, str) and len(n.value) >= 3
                   and any(name.startswith(n.value) for name in names) for n in ast.walk(node))

    conditions = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.If, ast.IfExp, ast.While, ast.Assert)):
            conditions.append(node.test)
        elif isinstance(node, (ast.Compare, ast.BoolOp)) or isinstance(node, ast.comprehension):
            conditions.append(node)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in ('startswith', 'endswith', 'get')):
            conditions.append(node)
    found = [node for node in conditions if mentions(node)]
    found += [node for node in ast.walk(tree) if isinstance(node, ast.Attribute) and node.attr in names]
    return sorted({f'{node.lineno}: {ast.get_source_segment(source, node)}' for node in found})


def test_the_condition_finder_finds_a_family_name(tmp_path):
    path = tmp_path / 'module.py'
    path.write_text("if config.model.name == 'vit':\n    pass\nx = name.startswith('resnet')\ny = config.model.vit\n"
                    "z = {'vit': 1}\n")
    assert len(family_names_in_conditions(str(path), {'vit', 'resnet50'})) == 3


def test_the_trainer_and_config_validation_know_no_model_family_by_name():
    """Model families are reached through growjax.families (issue 22): the trainer and config_lib
    hold no branch on a model's name, so a new family is one module plus one registry line."""
    from growjax import families
    names = set(families.model_names())
    assert {'small_cnn', 'vit', 'resnet50'} <= names
    for module in ('train', 'config_lib'):
        assert family_names_in_conditions(os.path.join(REPO, 'growjax', f'{module}.py'), names) == [], module


def test_scripts_do_not_edit_sys_path():
    """bench/ and experiments/ run as modules from the repository root (`python -m bench.step_cost`),
    so they import growjax and each other without putting folders on sys.path."""
    edits = []
    for folder in ('bench', 'experiments'):
        for file in sorted(os.listdir(os.path.join(REPO, folder))):
            if file.endswith('.py'):
                with open(os.path.join(REPO, folder, file)) as f:
                    tree = ast.parse(f.read())
                edits += [f'{folder}/{file}:{node.lineno}' for node in ast.walk(tree)
                          if isinstance(node, ast.Attribute) and node.attr == 'path'
                          and isinstance(node.value, ast.Name) and node.value.id == 'sys']
    assert edits == []


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for module in graph[todo.pop()] - seen:
            seen.add(module)
            todo.append(module)
    return seen


def test_config_flows_down_from_the_trainer_to_the_families_and_jobs():
    """main.py -> train -> config_lib / families -> a family -> its job and the library below: no
    module under the trainer imports it or config_lib back (issue 22: the walk does not climb)."""
    graph = import_graph()
    assert 'growjax.families' in reachable(graph, 'growjax.train')
    for module in ('growjax.families', 'growjax.families.gpt', 'growjax.lm_train', 'growjax.methods'):
        assert not reachable(graph, module) & {'growjax.train', 'growjax.config_lib'}, module


def test_every_test_slow_txt_names_exists():
    """A renamed test would silently leave tests/slow.txt (and join the fast run): names must exist."""
    root = pathlib.Path(__file__).parent
    for line in (root / 'slow.txt').read_text().splitlines():
        if line.strip() and not line.startswith('#'):
            path, name = line.split('[')[0].split('::')
            assert f'def {name}(' in (root.parent / path).read_text(), line


# The layers of docs/design.md ("Where each concept lives"), top to bottom: a module may import only
# modules of its own layer's package or of layers above it.
LAYERS = ('errors', 'nn', 'lm', 'outputs', 'runtime', 'checkpoint', 'grow', 'groups', 'expand', 'steps', 'methods',
          'models', 'surgery', 'nnx_surgery', 'pretrained', 'data', 'lm_train', 'families', 'config_lib', 'train',
          'analysis')


def layer_of(module: str) -> str:
    """'growjax.surgery.ops' -> 'surgery'; the package itself (growjax/__init__) has no layer."""
    return module.split('.')[1] if module.count('.') else ''


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return [f'{m} imports {d}' for m, deps in graph.items() if layer_of(m) for d in deps
            if layer_of(d) and LAYERS.index(layer_of(d)) > LAYERS.index(layer_of(m))]


def test_imports_point_up_the_layers():
    graph = import_graph()
    assert {layer_of(m) for m in graph} - {''} == set(LAYERS), 'a module of no layer: add it to LAYERS and design.md'
    assert upward_imports(graph) == []


def test_the_layer_check_finds_an_import_from_below():
    assert upward_imports({'growjax.grow': {'growjax.train'}, 'growjax.train': {'growjax.grow'}}) == [
        'growjax.grow imports growjax.train']
