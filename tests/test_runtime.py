"""The training process's allocator settings (flows/runtime.py)."""

from __future__ import annotations

import ctypes
import ctypes.util

from flows.runtime import ENV_SWITCH, M_MMAP_THRESHOLD, tune_allocator


def test_tune_allocator_applies_on_linux_glibc_and_is_idempotent():
    # CI and this project's machines are Linux with glibc: the settings must take
    assert tune_allocator() is True
    assert tune_allocator() is True
    # the setting it relies on is accepted by this libc (mallopt returns 1 on success)
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    assert libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) == 1


def test_tune_allocator_can_be_switched_off(monkeypatch):
    monkeypatch.setenv(ENV_SWITCH, "0")
    assert tune_allocator() is False
