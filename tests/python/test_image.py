"""The kiln Python package with a root-filesystem image: `kiln.Sandbox(image="python")` boots
the Debian + Python image that `cargo xtask test` builds before tier 4 (the image store in
$KILN_ASSETS_DIR), runs Python in it as the image's user, and keeps writes in its overlay."""

import pytest

import kiln

from conftest import config


def test_python_image_runs_python_and_writes_stay_in_the_overlay():
    with kiln.Sandbox(**config("py-image", memory_mib=512, image="python", overlay_size_mib=64)) as sb:
        r = sb.run(["python3", "-c", "import numpy, sys; print(6*7, numpy.__name__, sys.version_info[0])"])
        assert r.exit_code == 0, r
        assert r.stdout.decode().split() == ["42", "numpy", "3"]
        who = sb.run(["sh", "-c", "id -un; echo $HOME"])
        assert who.stdout.decode().split() == ["user", "/home/user"]
        sb.write("/home/user/hello.py", b"print('from a file')\n")
        r = sb.run(["python3", "/home/user/hello.py"])
        assert r.stdout == b"from a file\n"


def test_unknown_image_raises_config_error_naming_it():
    with pytest.raises(kiln.ConfigError) as e:
        kiln.Sandbox(**config("py-noimage", image="no-such-image-kiln"))
    assert "no-such-image-kiln" in str(e.value)


def test_overlay_size_must_convert():
    with pytest.raises(kiln.ConfigError) as e:
        kiln.Sandbox(**config("py-badoverlay", image="python", overlay_size_mib=-1))
    assert "overlay_size_mib" in str(e.value)
