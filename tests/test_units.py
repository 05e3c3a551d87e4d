import pytest

from micropod.errors import UsageError
from micropod.units import human_duration, parse_cpus, parse_memory_mib


@pytest.mark.parametrize("text,mib", [("256M", 256), ("256m", 256), ("1G", 1024), ("1g", 1024),
                                      ("512MiB", 512), ("1.5g", 1536), (str(128 << 20), 128)])
def test_memory(text: str, mib: int) -> None:
    assert parse_memory_mib(text) == mib


@pytest.mark.parametrize("text", ["", "abc", "12x", "-5M", "32M", "1.2.3G"])
def test_bad_memory(text: str) -> None:
    with pytest.raises(UsageError, match="--memory"):
        parse_memory_mib(text)


@pytest.mark.parametrize("text,n", [("1", 1), ("2", 2), ("0.5", 1), ("1.5", 2)])
def test_cpus(text: str, n: int) -> None:
    assert parse_cpus(text) == n


@pytest.mark.parametrize("text", ["0", "-1", "x", "1000"])
def test_bad_cpus(text: str) -> None:
    with pytest.raises(UsageError, match="--cpus"):
        parse_cpus(text)


def test_durations() -> None:
    assert human_duration(0.2) == "Less than a second"
    assert human_duration(5) == "5 seconds"
    assert human_duration(61) == "About a minute"
    assert human_duration(7200) == "2 hours"
