"""The removal value: normalised, its text and JSON forms round-trip, and set algebra on blocks."""

import pytest

from search.model.removal import Removal


def test_a_layer_losing_both_blocks_is_a_whole_layer_removal():
    removal = Removal.of(attention=[3, 5], mlp=[5, 7])
    assert removal == Removal.of([5], attention=[3], mlp=[7])
    assert (removal.layers, removal.attention, removal.mlp) == ((5,), (3,), (7,))
    assert Removal.of([2, 2, 1], attention=[1]) == Removal.of([1, 2])  # a whole layer absorbs its blocks


def test_key_is_the_old_layer_key_for_whole_layers_and_round_trips():
    assert Removal.of([17, 14]).key == "14,17"  # what stores written before blocks hold
    removal = Removal.of([14], attention=[6, 7], mlp=[12])
    assert removal.key == "14,a6,a7,m12"
    assert Removal.parse(removal.key) == removal
    assert Removal.parse("") == Removal() and not Removal()
    with pytest.raises(ValueError, match="not a layer"):
        Removal.parse("x3")


def test_json_round_trips_and_reads_records_from_before_blocks():
    removal = Removal.of([1], attention=[4], mlp=[2])
    assert removal.json() == {"removed_layers": [1], "removed_attention": [4], "removed_mlp": [2]}
    assert Removal.from_json(removal.json()) == removal
    assert Removal.from_json({"removed_layers": [3, 5], "score": 1.2}) == Removal.of([3, 5])


def test_block_algebra():
    a = Removal.of(attention=[2])
    assert a | Removal.of(mlp=[2]) == Removal.of([2])
    assert Removal.of([2]) - Removal.of(attention=[2]) == Removal.of(mlp=[2])  # a layer split into a block
    assert Removal.of([2]).covers(a) and not a.covers(Removal.of([2]))
    assert Removal.of([0], attention=[3]).without_attention == (0, 3)
    assert Removal.of([0], attention=[3]).changed_layers == (0, 3)
    assert list(Removal.of([1], attention=[3], mlp=[4]).parts()) == [
        Removal.of([1]),
        Removal.of(attention=[3]),
        Removal.of(mlp=[4]),
    ]


def test_params_count_whole_layers_and_lone_blocks():
    layer_params, block_params = [10, 10, 10], [(3, 7), (3, 7), (3, 7)]
    assert Removal.of([0], attention=[1], mlp=[2]).params(layer_params, block_params) == 10 + 3 + 7


def test_remap_moves_parts_onto_another_stack():
    removal = Removal.of([1], attention=[4], mlp=[2])
    assert removal.remap({0: 0, 2: 1, 3: 2, 4: 3}) == Removal.of(attention=[3], mlp=[1])  # layer 1 not in the map


def test_describe():
    assert Removal.of([14, 17]).describe() == "[14, 17]"
    assert Removal.of([14], attention=[6]).describe() == "layers [14], attention [6]"
