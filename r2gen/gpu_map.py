"""Which NVML device is torch's cuda:N: NVML ignores CUDA_VISIBLE_DEVICES, so devices are paired by UUID.

Here (not in launcher/) because both the launcher's facts (launcher.hardware) and the training
loop's GPU monitor (r2gen.monitor) read NVML for torch's devices. `nvml_indices_for_torch` is the
pure rule, tested with plain values; `map_torch_to_nvml` gathers its inputs from torch and NVML.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import NamedTuple


class NvmlMapping(NamedTuple):
    indices: list[int | None]         # per torch index: NVML's index of that GPU, None where none matched
    how: str                          # how they were matched (and what could not be), for gpu_note


def _bare_uuid(uuid: str) -> str:
    """'GPU-8F2C...' and '8f2c...' alike: lower case, no 'GPU-' (NVML has it, torch's str(uuid) has not)."""
    text = uuid.strip().lower()
    return text[4:] if text.startswith("gpu-") else text


def _visible_nvml_indices(visible: str | None, nvml_uuids: Sequence[str]) -> list[int | None]:
    """NVML's index of each device CUDA_VISIBLE_DEVICES makes visible, in CUDA's order (None: a MIG instance).

    CUDA's rules, as torch.cuda._parse_visible_devices mirrors them: the first entry's kind (index,
    'GPU-' UUID or prefix of one, 'MIG-') holds for the list; an entry that is not of that kind, not
    a number, out of range, or an unknown or ambiguous UUID prefix ends the list; a repeated device
    leaves none visible. Unset: every device, in NVML's order.
    """
    if visible is None:
        return list(range(len(nvml_uuids)))
    bare_nvml = [_bare_uuid(u) for u in nvml_uuids]
    entries = [entry.strip() for entry in visible.split(",")]
    kind = entries[0][:4].upper() if entries[0][:4].upper() in ("GPU-", "MIG-") else "index"
    found: list[int | None] = []
    for entry in entries:
        if kind != "index" and entry[:4].upper() != kind:
            break
        if kind == "MIG-":
            found.append(None)  # a MIG instance: NVML's device handles are whole GPUs
            continue
        if kind == "GPU-":
            prefix = _bare_uuid(entry)
            matches = [i for i, u in enumerate(bare_nvml) if prefix and u.startswith(prefix)]
            if len(matches) != 1:
                break
            index = matches[0]
        else:
            number = re.match(r"\+?(\d+)", entry)  # like strtoul: '1gpu' is 1, 'x' or '-1' ends the list
            if number is None or int(number.group(1)) >= len(nvml_uuids):
                break
            index = int(number.group(1))
        if index in found:
            return []
        found.append(index)
    return found


def nvml_indices_for_torch(torch_uuids: Sequence[str | None], nvml_uuids: Sequence[str], visible: str | None,
                           device_order: str | None = None) -> NvmlMapping:
    """For each of torch's devices (torch_uuids[i] is cuda:i's UUID), NVML's index of the same GPU.

    NVML ignores CUDA_VISIBLE_DEVICES and always numbers every GPU by PCI bus, so with
    CUDA_VISIBLE_DEVICES=3 torch's cuda:0 is NVML's GPU 3; CUDA_DEVICE_ORDER (FASTEST_FIRST by
    default) may reorder CUDA's indices too. Hence the rule: a device whose UUID torch gives is
    matched by UUID ('GPU-' prefix and case ignored), right whatever those variables say, and is
    None when NVML has no such GPU (a MIG instance has its own UUID). Only a device torch gives no
    UUID for falls back to CUDA_VISIBLE_DEVICES (`visible`, parsed as CUDA does) by position; that
    is sure for indices only with `device_order` PCI_BUS_ID, which `how` says.
    """
    by_uuid = {_bare_uuid(u): i for i, u in enumerate(nvml_uuids) if _bare_uuid(u)}
    fallback = _visible_nvml_indices(visible, nvml_uuids)
    indices: list[int | None] = []
    by_uuid_ts, no_uuid_ts = [], []
    for t, uuid in enumerate(torch_uuids):
        if uuid and _bare_uuid(uuid):
            indices.append(by_uuid.get(_bare_uuid(uuid)))
            by_uuid_ts.append(t)
        else:
            indices.append(fallback[t] if t < len(fallback) else None)
            no_uuid_ts.append(t)

    def devices(ts: list[int]) -> str:
        return ", ".join(f"cuda:{t}" for t in ts)

    how = []
    if by_uuid_ts:
        how.append("by UUID" if not no_uuid_ts else f"by UUID for {devices(by_uuid_ts)}")
    if no_uuid_ts:
        source = "NVML's order (CUDA_VISIBLE_DEVICES unset)" if visible is None else f"CUDA_VISIBLE_DEVICES={visible!r}"
        how.append(f"torch gave no UUID for {devices(no_uuid_ts)}: by position in {source}")
        uses_indices = visible is None or visible.strip()[:4].upper() not in ("GPU-", "MIG-")
        if uses_indices and (device_order or "").strip().upper() != "PCI_BUS_ID":
            how.append("assumes CUDA numbers the GPUs as NVML does, by PCI bus (sure only with "
                       "CUDA_DEVICE_ORDER=PCI_BUS_ID)")
    if unmatched := [t for t, index in enumerate(indices) if index is None]:
        how.append(f"no NVML GPU matches {devices(unmatched)}")
    return NvmlMapping(indices, "; ".join(how) or "no GPU to match")


def nvml_text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def map_torch_to_nvml(handles: Sequence[object]) -> NvmlMapping:
    """NVML's index (into `handles`, NVML's devices in its order; NVML initialised) of each of torch's devices.

    Reads torch's UUIDs (this initialises torch's CUDA runtime, creating no context) and NVML's, and
    the CUDA_VISIBLE_DEVICES and CUDA_DEVICE_ORDER of this process.
    """
    import pynvml
    import torch

    torch_uuids = []
    for i in range(torch.cuda.device_count()):
        uuid = getattr(torch.cuda.get_device_properties(i), "uuid", None)  # str() is '8f2c...-...', no 'GPU-'
        torch_uuids.append(None if uuid is None else str(uuid))
    nvml_uuids = []
    for handle in handles:
        try:
            nvml_uuids.append(nvml_text(pynvml.nvmlDeviceGetUUID(handle)))
        except pynvml.NVMLError:
            nvml_uuids.append("")
    return nvml_indices_for_torch(torch_uuids, nvml_uuids, os.environ.get("CUDA_VISIBLE_DEVICES"),
                                  os.environ.get("CUDA_DEVICE_ORDER"))
