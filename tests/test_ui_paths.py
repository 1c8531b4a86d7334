"""Paths a request names stay inside their root."""

import pytest

from dreambooth_moslora.adapter.errors import UserInputError
from dreambooth_moslora.ui.paths import inside


@pytest.mark.parametrize("relative", ["../x", "a/../../x", "/etc/passwd", "", "a\\..\\..\\x"])
def test_paths_out_of_the_root_are_refused(tmp_path, relative):
    with pytest.raises(UserInputError, match="refused"):
        inside(tmp_path, relative)


def test_paths_inside_the_root_are_given_back_resolved(tmp_path):
    (tmp_path / "a").mkdir()
    assert inside(tmp_path, "a/./b.png") == tmp_path.resolve() / "a" / "b.png"
