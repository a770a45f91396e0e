"""kiln Python package checks that need no VM: the module, the exception hierarchy, and
configuration errors raised before KVM is touched. Run on the host by `cargo xtask python`
and in tier 4 with the rest of tests/python."""

import datetime
import math

import pytest

import kiln
import kiln.aio


def test_module_exports_the_api():
    assert kiln.__version__
    for name in ["Sandbox", "SandboxPool", "Result", "Event", "ExecStream", "DirEntry",
                 "FileStat", "SnapshotInfo", "PoolStats"]:
        assert hasattr(kiln, name), name
    assert kiln.DEFAULT_OUTPUT_CAP == 64 * 1024 * 1024
    assert kiln.Sandbox.__module__ == "kiln"
    assert "boots" in kiln.Sandbox.__doc__.lower() or kiln.Sandbox.run.__doc__


def test_exception_hierarchy():
    assert issubclass(kiln.ConfigError, kiln.KilnError)
    assert issubclass(kiln.ConfigError, ValueError)
    assert issubclass(kiln.MissingAssetError, kiln.ConfigError)
    assert issubclass(kiln.UnsupportedHostError, kiln.NoKvmError)
    assert issubclass(kiln.BootTimeout, kiln.BootError)
    assert issubclass(kiln.BootTimeout, TimeoutError)
    assert issubclass(kiln.NotFoundError, kiln.GuestError)
    assert issubclass(kiln.NotFoundError, FileNotFoundError)
    assert issubclass(kiln.CommandTimeout, kiln.CommandError)
    assert issubclass(kiln.PoolTimeout, kiln.PoolError)
    for cls in [kiln.GuestDied, kiln.AgentTimeout, kiln.ProtocolError, kiln.SnapshotError,
                kiln.SandboxClosedError, kiln.ExecError, kiln.VmError]:
        assert issubclass(cls, kiln.KilnError)
        assert cls.__module__ == "kiln"
        assert cls.__doc__
    assert kiln.KilnError.serial_tail is None


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"vcpus": 0}, "vcpus"),
        ({"vcpus": 99}, "vcpus"),
        ({"vcpus": -1}, "vcpus"),
        ({"memory_mib": 1}, "memory_mib"),
        ({"boot_timeout": 0}, "boot_timeout"),
        ({"request_timeout": -2.5}, "request_timeout"),
        ({"boot_timeout": math.nan}, "boot_timeout"),
        ({"name": "bad name!"}, "name"),
        ({"extra_cmdline": "x\ny"}, "extra_cmdline"),
    ],
)
def test_bad_config_raises_config_error(kwargs, field):
    with pytest.raises(kiln.ConfigError) as ei:
        kiln.Sandbox(**kwargs)
    assert field in str(ei.value)
    assert isinstance(ei.value, ValueError)


def test_missing_kernel_is_a_missing_asset_error(tmp_path):
    with pytest.raises(kiln.MissingAssetError) as ei:
        kiln.Sandbox(kernel=tmp_path / "no-vmlinux")
    assert "no-vmlinux" in str(ei.value)


def test_wrong_types_raise_type_error():
    with pytest.raises(TypeError):
        kiln.Sandbox(boot_timeout="soon")
    with pytest.raises(TypeError):
        kiln.Sandbox(vcpus="2")
    with pytest.raises(TypeError):
        kiln.Sandbox(boot_timeout=True)


def test_timedelta_is_accepted_for_durations():
    # Valid duration, invalid vcpus: the duration converts, validation then names vcpus.
    with pytest.raises(kiln.ConfigError, match="vcpus"):
        kiln.Sandbox(vcpus=0, boot_timeout=datetime.timedelta(seconds=30))


def test_bad_pool_config_raises_config_error(tmp_path):
    # Stand-in guest files: the sandbox configuration validates first and only checks they exist.
    assets = {"kernel": tmp_path / "vmlinux", "initramfs": tmp_path / "initramfs.cpio"}
    for p in assets.values():
        p.write_bytes(b"")
    with pytest.raises(kiln.ConfigError, match="reset_mode"):
        kiln.SandboxPool(reset_mode="sometimes", **assets)
    with pytest.raises(kiln.ConfigError, match="max_size"):
        kiln.SandboxPool(min_size=0, max_size=0, **assets)
    with pytest.raises(kiln.ConfigError, match="min_size"):
        kiln.SandboxPool(min_size=-1, **assets)
    with pytest.raises(kiln.ConfigError, match="vcpus"):
        kiln.SandboxPool(vcpus=0)


def test_aio_reports_config_errors_too():
    import asyncio

    async def boot():
        await kiln.aio.Sandbox.create(vcpus=0)

    with pytest.raises(kiln.ConfigError):
        asyncio.run(boot())
