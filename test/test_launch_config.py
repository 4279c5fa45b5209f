"""Launch files, YAML configuration and node declarations must not drift apart."""

import ast
import importlib
import pathlib
import re

import pytest
import rclpy
from rclpy.parameter import Parameter
import yaml

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH_FILES = sorted((REPO / 'launch').glob('*.launch.py'))

# YAML file -> (node name in the file, module, Node subclass).
NODE_CONFIGS = {
    'perception.yaml': ('perception_node', 'gradclip_ros.perception_node', 'PerceptionNode'),
    'online_learning.yaml': (
        'online_learner_node', 'gradclip_ros.online_learner_node', 'OnlineLearnerNode'),
}

# Parameters every rclpy node declares by itself; they need no YAML entry.
IMPLICIT_PARAMETERS = {'use_sim_time', 'start_type_description_service'}

YAML_TYPES = {
    Parameter.Type.BOOL: bool,
    Parameter.Type.INTEGER: int,
    Parameter.Type.DOUBLE: float,
    Parameter.Type.STRING: str,
}


def console_scripts():
    text = (REPO / 'setup.py').read_text()
    return set(re.findall(r"'([\w-]+) = gradclip_ros\.", text))


def launch_executables(path):
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.keyword) and node.arg == 'executable':
            assert isinstance(node.value, ast.Constant), f'{path.name}: executable not a literal'
            names.add(node.value.value)
        if isinstance(node, ast.List):  # ExecuteProcess(cmd=['ros2', 'run', PKG, EXE, ...])
            items = [e.value for e in node.elts[:4] if isinstance(e, ast.Constant)]
            if items[:3] == ['ros2', 'run', 'gradclip_ros'] and len(items) == 4:
                names.add(items[3])
    return names


def test_launch_files_exist():
    names = {path.name for path in LAUNCH_FILES}
    assert {'perception.launch.py', 'online_learning.launch.py',
            'gradclip.launch.py'} <= names


@pytest.mark.parametrize('path', LAUNCH_FILES, ids=lambda p: p.name)
def test_launch_executables_are_console_scripts(path):
    scripts = console_scripts()
    for name in launch_executables(path):
        assert name in scripts, f'{path.name} starts {name!r}, which setup.py does not install'


@pytest.mark.parametrize('path', LAUNCH_FILES, ids=lambda p: p.name)
def test_launch_arguments_described(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, 'id', '') == 'DeclareLaunchArgument':
            keywords = {k.arg for k in node.keywords}
            name = node.args[0].value if node.args else '?'
            assert 'description' in keywords, f'{path.name}: argument {name!r} has no description'


def declared_parameters(module_name, class_name):
    """Construct the node for real and return {name: Parameter.Type} of what it declares."""
    module = importlib.import_module(module_name)
    context = rclpy.Context()
    rclpy.init(context=context)
    try:
        node = getattr(module, class_name)(context=context)
        try:
            return {name: param.type_ for name, param in node._parameters.items()
                    if name not in IMPLICIT_PARAMETERS and not name.startswith('qos_overrides')}
        finally:
            node.destroy_node()
    finally:
        rclpy.shutdown(context=context)


@pytest.mark.parametrize('yaml_name', sorted(NODE_CONFIGS))
def test_yaml_matches_declarations(yaml_name):
    node_name, module_name, class_name = NODE_CONFIGS[yaml_name]
    document = yaml.safe_load((REPO / 'config' / yaml_name).read_text())
    values = document[node_name]['ros__parameters']
    declared = declared_parameters(module_name, class_name)

    missing_in_yaml = sorted(set(declared) - set(values))
    unknown_in_yaml = sorted(set(values) - set(declared) - IMPLICIT_PARAMETERS)
    assert not missing_in_yaml, f'{yaml_name} lacks declared parameters: {missing_in_yaml}'
    assert not unknown_in_yaml, f'{yaml_name} sets undeclared parameters: {unknown_in_yaml}'

    for name, value in values.items():
        if name in IMPLICIT_PARAMETERS:
            continue
        kind = declared[name]
        if kind in YAML_TYPES:
            expected = YAML_TYPES[kind]
            ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
            assert ok, f'{yaml_name}: {name} = {value!r} but the node declares {kind.name}'
        elif kind in (Parameter.Type.STRING_ARRAY, Parameter.Type.DOUBLE_ARRAY,
                      Parameter.Type.INTEGER_ARRAY, Parameter.Type.BOOL_ARRAY):
            assert isinstance(value, list), f'{yaml_name}: {name} must be a list ({kind.name})'


def test_every_yaml_entry_has_a_comment():
    for yaml_name in NODE_CONFIGS:
        lines = (REPO / 'config' / yaml_name).read_text().splitlines()
        for number, line in enumerate(lines, 1):
            stripped = line.strip()
            if not stripped or stripped.startswith('#') or stripped.endswith(':'):
                continue
            previous = lines[number - 2].strip() if number > 1 else ''
            assert '#' in line or previous.startswith('#'), \
                f'{yaml_name}:{number}: parameter without a comment: {stripped}'


def test_launch_starts_graph():
    """Start gradclip.launch.py for real where launch_ros exists (a ROS 2 install)."""
    launch_ros = pytest.importorskip(
        'launch_ros', reason='launch_ros is not installed in the pip-based environment; '
                             'ros2 launch needs a ROS 2 install')
    import launch
    from launch.launch_description_sources import PythonLaunchDescriptionSource

    description = launch.LaunchDescription([
        launch.actions.IncludeLaunchDescription(
            PythonLaunchDescriptionSource(str(REPO / 'launch' / 'gradclip.launch.py'))),
    ])
    exits = []
    description.add_action(launch.actions.RegisterEventHandler(
        launch.event_handlers.OnProcessExit(
            on_exit=lambda event, context: exits.append(
                (event.action.name, event.returncode)))))
    # The nodes run until stopped, so shut the launch down after they had time to start.
    description.add_action(launch.actions.TimerAction(
        period=20.0, actions=[launch.actions.Shutdown(reason='test finished')]))
    service = launch.LaunchService()
    service.include_launch_description(description)
    assert launch_ros is not None
    assert service.run() == 0
    early = [(name, code) for name, code in exits if code not in (0, -2, -15)]
    assert not early, f'processes failed during the launch: {early}'
