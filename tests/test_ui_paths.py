"""Paths a request names stay inside their root."""

import pytest

from dreambooth_moslora.adapter.errors import UserInputError
from dreambooth_moslora.ui.paths import inside, named_folder


@pytest.mark.parametrize("relative", ["../x", "a/../../x", "/etc/passwd", "", "a\\..\\..\\x", "a\0b"])
def test_paths_out_of_the_root_are_refused(tmp_path, relative):
    with pytest.raises(UserInputError, match="refused"):
        inside(tmp_path, relative)


def test_paths_inside_the_root_are_given_back_resolved(tmp_path):
    (tmp_path / "a").mkdir()
    assert inside(tmp_path, "a/./b.png") == tmp_path.resolve() / "a" / "b.png"


def test_a_symbolic_link_out_of_the_root_is_refused_and_a_nul_is_a_user_error(tmp_path):
    (tmp_path / "root").mkdir()
    (tmp_path / "secret.png").write_bytes(b"x")
    (tmp_path / "root" / "link.png").symlink_to(tmp_path / "secret.png")
    with pytest.raises(UserInputError, match="leads out of the folder"):
        inside(tmp_path / "root", "link.png")
    with pytest.raises(UserInputError, match="folder not found"):
        named_folder(f"{tmp_path}\0x")
