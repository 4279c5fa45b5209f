"""The README lists exactly the parameters and topics that perception_node declares."""

import pathlib
import re

import pytest
import rclpy
from rclpy.node import Node
import yaml

from gradclip_ros.perception_node import PerceptionNode

DOCS = pathlib.Path(__file__).resolve().parents[1] / 'README.md'
TYPE_NAMES = {
    'string': rclpy.Parameter.Type.STRING, 'bool': rclpy.Parameter.Type.BOOL,
    'integer': rclpy.Parameter.Type.INTEGER, 'double': rclpy.Parameter.Type.DOUBLE,
    'string array': rclpy.Parameter.Type.STRING_ARRAY,
}


def markdown_table(text, heading):
    """Return the rows of the first table after ``heading`` as lists of stripped cells."""
    section = text.split(heading, 1)[1]
    rows = []
    for line in section.splitlines():
        if line.startswith('|'):
            rows.append([cell.strip() for cell in line.strip().strip('|').split('|')])
        elif rows:
            break
    return rows[2:]  # skip the header and the separator


def unquote(cell):
    match = re.fullmatch(r'`([^`]*)`', cell)
    assert match, f'expected one `code` value, got {cell!r}'
    return match.group(1)


@pytest.fixture(scope='module')
def declared():
    """Return ({name: (type, default, read_only)} without rclpy's own, topic names)."""
    context = rclpy.Context()
    rclpy.init(context=context)
    try:
        node = PerceptionNode(context=context)
        builtin = Node('builtin_parameters', context=context)
        own = sorted(set(node.list_parameters([], 0).names)
                     - set(builtin.list_parameters([], 0).names))
        result = {}
        for name in own:
            parameter = node.get_parameter(name)
            descriptor = node.describe_parameter(name)
            result[name] = (parameter.type_, parameter.value, descriptor.read_only)
        topics = ({subscription.topic_name for subscription in node.subscriptions}
                  | {publisher.topic_name for publisher in node.publishers})
        node.destroy_node()
        builtin.destroy_node()
        return result, topics
    finally:
        rclpy.shutdown(context=context)


def test_parameter_table_matches_declarations(declared):
    declared, _ = declared
    rows = markdown_table(DOCS.read_text(), '### Parameters')
    documented = {unquote(row[0]): row for row in rows}

    assert sorted(documented) == sorted(declared)
    for name, (type_, default, read_only) in declared.items():
        row = documented[name]
        assert TYPE_NAMES[row[1]] == type_, f'{name}: documented type {row[1]!r}'
        assert yaml.safe_load(unquote(row[2]) or "''") == default, f'{name}: default'
        assert (row[3] == 'read-only') == read_only, f'{name}: run-time column {row[3]!r}'


def test_topic_table_matches_node(declared):
    _, topics = declared
    rows = markdown_table(DOCS.read_text(), '### Topics')
    documented = {unquote(row[0]).replace('<camera>', 'front') for row in rows}

    # The default node has the one camera 'front' on the raw transport.
    node_topics = {topic.lstrip('/') if topic != '/diagnostics' else topic for topic in topics}
    node_topics -= {'parameter_events', 'rosout'}
    assert node_topics <= documented
    assert documented - node_topics == {'front/image_raw/compressed'}
