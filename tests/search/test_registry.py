import pytest

from search.errors import SearchError
from search.registry import Registry


def test_a_registry_lists_its_choices_and_refuses_others_in_one_line():
    colours: Registry[int] = Registry("colour")
    colours.add("red", 1, "warm")

    @colours.register("blue", "cold")
    def blue() -> int:
        return 2

    assert colours["red"] == 1 and colours["blue"] is blue and "red" in colours and list(colours) == ["red", "blue"]
    assert colours.describe() == "red: warm; blue: cold"
    with pytest.raises(SearchError, match=r"^unknown colour 'green' \(one of: red, blue\)$"):
        colours["green"]
    with pytest.raises(ValueError, match="twice"):
        colours.add("red", 3, "again")


def test_every_cli_choice_comes_from_a_registry(tmp_path):
    from search.cli.parser import build_parser
    from search.export import PICKS
    from search.methods import METHODS
    from search.model.numerics import DTYPES
    from search.sampler import SAMPLERS
    from search.seeding.criteria import CRITERIA

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    choices = {(cmd, a.dest): tuple(a.choices) for cmd, p in sub.items() for a in p._actions if a.choices}
    assert choices[("run", "criterion")] == CRITERIA.names and choices[("run", "sampler")] == SAMPLERS.names
    assert choices[("method", "method")] == METHODS.names and choices[("export", "pick")] == PICKS.names
    assert choices[("run", "dtype")] == ("auto", *DTYPES.names)
