"""Spec sections cited by the machine-readable spec, numbered as in virtio 1.4.

Every constant is a :class:`~virtio.spec._base.Section`; normative sections carry the
LaTeX label (``devicenormative:...`` / ``drivernormative:...``) so a requirement can
be found by label even where numbering differs between spec versions.

Where the numbers come from
---------------------------
The numbers were computed from the ``\\chapter``/``\\section``/``\\subsection``/...
structure of the spec's LaTeX sources in ``oasis-tcs/virtio-spec`` (``content.tex``,
which ``\\input``s ``split-ring.tex``, ``packed-ring.tex``, ``transport-mmio.tex`` and
``device-types/*/description.tex``), with ``introduction.tex`` being chapter 1.
The split-ring (2.7.x) numbers were also cross-checked against a published section-
numbered rendering of the 1.2 text, which has the same layout.

Numbering differences between versions
--------------------------------------
* 1.1: Split and Packed virtqueues are **2.6 / 2.7** (there is no "Device Reset"
  section).  1.2 added "2.4 Device Reset", which moved them to **2.7 / 2.8**; 1.2,
  1.3 and 1.4 all use 2.7 / 2.8 (so "The Virtqueue Descriptor Table" is 2.6.5 in
  1.1 and 2.7.5 from 1.2 on).  The subsection numbers *inside* 2.7 and 2.8 are the
  same in 1.2, 1.3 and 1.4.
* 2.6.1 "Virtqueue Reset" exists since 1.2 (VIRTIO_F_RING_RESET).
* Network device: 1.2/1.3 number "Device Operation" **5.1.6** (header layout,
  Packet Transmission 5.1.6.2, ..., Control Virtqueue 5.1.6.5).  The 1.4 text
  inserts "5.1.6 Device and driver capabilities", "5.1.7 Device resource objects"
  and "5.1.8 Device parts" (admin-command based flow filters), moving Device
  Operation to **5.1.9**.  Sections 5.1.1-5.1.5 are unchanged.  Inside 5.1.9, 1.4
  adds "5.1.9.6 Flow filter" and "5.1.9.7 IPsec Operation", so "Legacy Interface:
  Framing Requirements" is **5.1.9.8** (checked against tag v1.4-cs01).
* Block (5.2.x), input (5.8.x), MMIO (4.2.x) and reserved feature bits (6.x) have
  the same numbers in 1.2, 1.3 and 1.4.
* PCI: 1.3 added "4.1.4.8 Vendor data capability", so the PCI configuration access
  capability is 4.1.4.9 in 1.3/1.4 but 4.1.4.8 in 1.2 (and the legacy note after it
  moved from 4.1.4.9 to 4.1.4.10).
* The label of 2.7.10 "Available Buffer Notification Suppression" is still the old
  ``sec:.../Virtqueue Notification Suppression`` (the section was renamed in 1.1).
"""

from __future__ import annotations

from virtio.spec._base import Section

# Path prefixes of LaTeX labels.
_BF = "Basic Facilities of a Virtio Device"
_VQ = f"{_BF} / Virtqueues"
_PVQ = f"{_BF} / Packed Virtqueues"
_MMIO = "Virtio Transport Options / Virtio Over MMIO"
_PCI = "Virtio Transport Options / Virtio Over PCI Bus"
_NET = "Device Types / Network Device"
_BLK = "Device Types / Block Device"
_INPUT = "Device Types / Input Device"
_RNG = "Device Types / Entropy Device"


def _dev(number: str, title: str, path: str) -> Section:
    return Section(number, f"Device Requirements: {title}", f"devicenormative:{path}")


def _drv(number: str, title: str, path: str) -> Section:
    return Section(number, f"Driver Requirements: {title}", f"drivernormative:{path}")


# --- Chapter 2: Basic Facilities of a Virtio Device ---------------------------------
S_2 = Section("2", _BF)
S_2_1 = Section("2.1", "Device Status Field")
S_2_1_1 = _drv("2.1.1", "Device Status Field", f"{_BF} / Device Status Field")
S_2_1_2 = _dev("2.1.2", "Device Status Field", f"{_BF} / Device Status Field")
S_2_2 = Section("2.2", "Feature Bits")
S_2_2_1 = _drv("2.2.1", "Feature Bits", f"{_BF} / Feature Bits")
S_2_2_2 = _dev("2.2.2", "Feature Bits", f"{_BF} / Feature Bits")
S_2_2_3 = Section("2.2.3", "Legacy Interface: A Note on Feature Bits")
S_2_3 = Section("2.3", "Notifications")
S_2_4 = Section("2.4", "Device Reset")
S_2_4_1 = _dev("2.4.1", "Device Reset", f"{_BF} / Device Reset")
S_2_4_2 = _drv("2.4.2", "Device Reset", f"{_BF} / Device Reset")
S_2_5 = Section("2.5", "Device Configuration Space")
S_2_5_1 = _drv("2.5.1", "Device Configuration Space", f"{_BF} / Device Configuration Space")
S_2_5_2 = _dev("2.5.2", "Device Configuration Space", f"{_BF} / Device Configuration Space")
S_2_5_3 = Section("2.5.3", "Legacy Interface: A Note on Device Configuration Space endian-ness")
S_2_5_4 = Section("2.5.4", "Legacy Interface: Device Configuration Space")
S_2_6 = Section("2.6", "Virtqueues")
S_2_6_1 = Section("2.6.1", "Virtqueue Reset")
S_2_6_1_1 = Section("2.6.1.1", "Virtqueue Reset")
S_2_6_1_1_1 = _dev("2.6.1.1.1", "Virtqueue Reset", f"{_VQ} / Virtqueue Reset / Virtqueue Reset")
S_2_6_1_1_2 = _drv("2.6.1.1.2", "Virtqueue Reset", f"{_VQ} / Virtqueue Reset / Virtqueue Reset")
S_2_6_1_2 = Section("2.6.1.2", "Virtqueue Re-enable")
S_2_6_1_2_1 = _dev(
    "2.6.1.2.1", "Virtqueue Re-enable", f"{_VQ} / Virtqueue Reset / Virtqueue Re-enable"
)
S_2_6_1_2_2 = _drv(
    "2.6.1.2.2", "Virtqueue Re-enable", f"{_VQ} / Virtqueue Reset / Virtqueue Re-enable"
)

# 2.7 Split Virtqueues (split-ring.tex).  Note the labels still say "Virtqueues".
S_2_7 = Section("2.7", "Split Virtqueues")
S_2_7_1 = _drv("2.7.1", "Virtqueues", _VQ)
S_2_7_2 = Section("2.7.2", "Legacy Interfaces: A Note on Virtqueue Layout")
S_2_7_3 = Section("2.7.3", "Legacy Interfaces: A Note on Virtqueue Endianness")
S_2_7_4 = Section("2.7.4", "Message Framing")
S_2_7_4_1 = _dev("2.7.4.1", "Message Framing", f"{_BF} / Message Framing")
S_2_7_4_2 = _drv("2.7.4.2", "Message Framing", f"{_BF} / Message Framing")
S_2_7_4_3 = Section("2.7.4.3", "Legacy Interface: Message Framing")
S_2_7_5 = Section("2.7.5", "The Virtqueue Descriptor Table")
S_2_7_5_1 = _dev(
    "2.7.5.1", "The Virtqueue Descriptor Table", f"{_VQ} / The Virtqueue Descriptor Table"
)
S_2_7_5_2 = _drv(
    "2.7.5.2", "The Virtqueue Descriptor Table", f"{_VQ} / The Virtqueue Descriptor Table"
)
S_2_7_5_3 = Section("2.7.5.3", "Indirect Descriptors")
S_2_7_5_3_1 = _drv(
    "2.7.5.3.1",
    "Indirect Descriptors",
    f"{_VQ} / The Virtqueue Descriptor Table / Indirect Descriptors",
)
S_2_7_5_3_2 = _dev(
    "2.7.5.3.2",
    "Indirect Descriptors",
    f"{_VQ} / The Virtqueue Descriptor Table / Indirect Descriptors",
)
S_2_7_6 = Section("2.7.6", "The Virtqueue Available Ring")
S_2_7_6_1 = _drv("2.7.6.1", "The Virtqueue Available Ring", f"{_VQ} / The Virtqueue Available Ring")
S_2_7_7 = Section("2.7.7", "Used Buffer Notification Suppression")
S_2_7_7_1 = _drv(
    "2.7.7.1",
    "Used Buffer Notification Suppression",
    f"{_VQ} / Used Buffer Notification Suppression",
)
S_2_7_7_2 = _dev(
    "2.7.7.2",
    "Used Buffer Notification Suppression",
    f"{_VQ} / Used Buffer Notification Suppression",
)
S_2_7_8 = Section("2.7.8", "The Virtqueue Used Ring")
S_2_7_8_1 = Section("2.7.8.1", "Legacy Interface: The Virtqueue Used Ring")
S_2_7_8_2 = _dev("2.7.8.2", "The Virtqueue Used Ring", f"{_VQ} / The Virtqueue Used Ring")
S_2_7_8_3 = _drv("2.7.8.3", "The Virtqueue Used Ring", f"{_VQ} / The Virtqueue Used Ring")
S_2_7_9 = Section("2.7.9", "In-order use of descriptors")
# Section label: "sec:Basic Facilities of a Virtio Device / Virtqueues / Virtqueue
# Notification Suppression" (kept from before the 1.1 rename).
S_2_7_10 = Section("2.7.10", "Available Buffer Notification Suppression")
S_2_7_10_1 = _drv(
    "2.7.10.1",
    "Available Buffer Notification Suppression",
    f"{_VQ} / Available Buffer Notification Suppression",
)
S_2_7_10_2 = _dev(
    "2.7.10.2",
    "Available Buffer Notification Suppression",
    f"{_VQ} / Available Buffer Notification Suppression",
)
S_2_7_11 = Section("2.7.11", "Helpers for Operating Virtqueues")
S_2_7_12 = Section("2.7.12", "Virtqueue Operation")
S_2_7_13 = Section("2.7.13", "Supplying Buffers to The Device")
S_2_7_13_1 = Section("2.7.13.1", "Placing Buffers Into The Descriptor Table")
S_2_7_13_2 = Section("2.7.13.2", "Updating The Available Ring")
S_2_7_13_3 = Section("2.7.13.3", "Updating idx")
S_2_7_13_3_1 = _drv(
    "2.7.13.3.1", "Updating idx", f"{_VQ} / Supplying Buffers to The Device / Updating idx"
)
S_2_7_13_4 = Section("2.7.13.4", "Notifying The Device")
S_2_7_13_4_1 = _drv(
    "2.7.13.4.1",
    "Notifying The Device",
    f"{_VQ} / Supplying Buffers to The Device / Notifying The Device",
)
S_2_7_14 = Section("2.7.14", "Receiving Used Buffers From The Device")

# 2.8 Packed Virtqueues (packed-ring.tex).
S_2_8 = Section("2.8", "Packed Virtqueues")
S_2_8_1 = Section("2.8.1", "Driver and Device Ring Wrap Counters")
S_2_8_2 = Section("2.8.2", "Polling of available and used descriptors")
S_2_8_3 = Section("2.8.3", "Write Flag")
S_2_8_4 = Section("2.8.4", "Element Address and Length")
S_2_8_5 = Section("2.8.5", "Scatter-Gather Support")
S_2_8_6 = Section("2.8.6", "Next Flag: Descriptor Chaining")
S_2_8_7 = Section("2.8.7", "Indirect Flag: Scatter-Gather Support")
S_2_8_8 = Section("2.8.8", "In-order use of descriptors")
S_2_8_9 = Section("2.8.9", "Multi-buffer requests")
S_2_8_10 = Section("2.8.10", "Driver and Device Event Suppression")
S_2_8_10_1 = Section("2.8.10.1", "Structure Size and Alignment")
S_2_8_11 = _drv("2.8.11", "Virtqueues", _PVQ)
S_2_8_12 = _dev("2.8.12", "Virtqueues", _PVQ)
S_2_8_13 = Section("2.8.13", "The Virtqueue Descriptor Format")
S_2_8_14 = Section("2.8.14", "Event Suppression Structure Format")
S_2_8_15 = _dev(
    "2.8.15", "The Virtqueue Descriptor Table", f"{_PVQ} / The Virtqueue Descriptor Table"
)
# The LaTeX label really is spelled "PAcked" here.
S_2_8_16 = _drv(
    "2.8.16",
    "The Virtqueue Descriptor Table",
    f"{_BF} / PAcked Virtqueues / The Virtqueue Descriptor Table",
)
S_2_8_17 = _drv("2.8.17", "Scatter-Gather Support", f"{_PVQ} / Scatter-Gather Support")
S_2_8_18 = _dev("2.8.18", "Scatter-Gather Support", f"{_PVQ} / Scatter-Gather Support")
S_2_8_19 = _drv(
    "2.8.19",
    "Indirect Descriptors",
    f"{_PVQ} / The Virtqueue Descriptor Table / Indirect Descriptors",
)
S_2_8_20 = Section("2.8.20", "Virtqueue Operation")
S_2_8_21 = Section("2.8.21", "Supplying Buffers to The Device")
S_2_8_21_1 = Section("2.8.21.1", "Placing Available Buffers Into The Descriptor Ring")
S_2_8_21_1_1 = _drv(
    "2.8.21.1.1", "Updating flags", f"{_PVQ} / Supplying Buffers to The Device / Updating flags"
)
S_2_8_21_2 = Section("2.8.21.2", "Sending Available Buffer Notifications")
S_2_8_21_3 = Section("2.8.21.3", "Implementation Example")
S_2_8_21_3_1 = _drv(
    "2.8.21.3.1",
    "Sending Available Buffer Notifications",
    f"{_PVQ} / Supplying Buffers to The Device / Sending Available Buffer Notifications",
)
S_2_8_22 = Section("2.8.22", "Receiving Used Buffers From The Device")

S_2_9 = Section("2.9", "Driver Notifications")
S_2_10 = Section("2.10", "Shared Memory Regions")
S_2_11 = Section("2.11", "Exporting Objects")

# --- Chapter 3: General Initialization And Device Operation -------------------------
S_3 = Section("3", "General Initialization And Device Operation")
S_3_1 = Section("3.1", "Device Initialization")
S_3_1_1 = _drv(
    "3.1.1",
    "Device Initialization",
    "General Initialization And Device Operation / Device Initialization",
)
S_3_1_2 = Section("3.1.2", "Legacy Interface: Device Initialization")
S_3_2 = Section("3.2", "Device Operation")
S_3_2_1 = Section("3.2.1", "Notification of Device Configuration Changes")
S_3_3 = Section("3.3", "Device Cleanup")
S_3_3_1 = _drv(
    "3.3.1", "Device Cleanup", "General Initialization And Device Operation / Device Cleanup"
)

# --- Chapter 4: Virtio Transport Options --------------------------------------------
S_4 = Section("4", "Virtio Transport Options")
S_4_1 = Section("4.1", "Virtio Over PCI Bus")
S_4_1_1 = _dev("4.1.1", "Virtio Over PCI Bus", _PCI)
S_4_1_2 = Section("4.1.2", "PCI Device Discovery")
S_4_1_2_1 = _dev("4.1.2.1", "PCI Device Discovery", f"{_PCI} / PCI Device Discovery")
S_4_1_2_2 = _drv("4.1.2.2", "PCI Device Discovery", f"{_PCI} / PCI Device Discovery")
S_4_1_2_3 = Section("4.1.2.3", "Legacy Interfaces: A Note on PCI Device Discovery")
S_4_1_3 = Section("4.1.3", "PCI Device Layout")
S_4_1_3_1 = _drv("4.1.3.1", "PCI Device Layout", f"{_PCI} / PCI Device Layout")
S_4_1_3_2 = _dev("4.1.3.2", "PCI Device Layout", f"{_PCI} / PCI Device Layout")
S_4_1_4 = Section("4.1.4", "Virtio Structure PCI Capabilities")
S_4_1_4_1 = _drv(
    "4.1.4.1", "Virtio Structure PCI Capabilities", f"{_PCI} / Virtio Structure PCI Capabilities"
)
S_4_1_4_2 = _dev(
    "4.1.4.2", "Virtio Structure PCI Capabilities", f"{_PCI} / Virtio Structure PCI Capabilities"
)
S_4_1_4_3 = Section("4.1.4.3", "Common configuration structure layout")
# The labels of 4.1.4.3-4.1.4.9 say "PCI Device Layout", though the sections sit in
# 4.1.4 "Virtio Structure PCI Capabilities" (transport-pci.tex).
_PCI_LAYOUT = f"{_PCI} / PCI Device Layout"
S_4_1_4_3_1 = _dev(
    "4.1.4.3.1",
    "Common configuration structure layout",
    f"{_PCI_LAYOUT} / Common configuration structure layout",
)
S_4_1_4_3_2 = _drv(
    "4.1.4.3.2",
    "Common configuration structure layout",
    f"{_PCI_LAYOUT} / Common configuration structure layout",
)
S_4_1_4_4 = Section("4.1.4.4", "Notification structure layout")
S_4_1_4_4_1 = _dev(
    "4.1.4.4.1", "Notification capability", f"{_PCI_LAYOUT} / Notification capability"
)
S_4_1_4_5 = Section("4.1.4.5", "ISR status capability")
S_4_1_4_5_1 = _dev("4.1.4.5.1", "ISR status capability", f"{_PCI_LAYOUT} / ISR status capability")
S_4_1_4_5_2 = _drv("4.1.4.5.2", "ISR status capability", f"{_PCI_LAYOUT} / ISR status capability")
S_4_1_4_6 = Section("4.1.4.6", "Device-specific configuration")
S_4_1_4_6_1 = _dev(
    "4.1.4.6.1", "Device-specific configuration", f"{_PCI_LAYOUT} / Device-specific configuration"
)
S_4_1_4_7 = Section("4.1.4.7", "Shared memory capability")
S_4_1_4_8 = Section("4.1.4.8", "Vendor data capability")
S_4_1_4_9 = Section("4.1.4.9", "PCI configuration access capability")
S_4_1_4_9_1 = _dev(
    "4.1.4.9.1",
    "PCI configuration access capability",
    f"{_PCI_LAYOUT} / PCI configuration access capability",
)
S_4_1_4_9_2 = _drv(
    "4.1.4.9.2",
    "PCI configuration access capability",
    f"{_PCI_LAYOUT} / PCI configuration access capability",
)
S_4_1_4_10 = Section("4.1.4.10", "Legacy Interfaces: A Note on PCI Device Layout")
S_4_1_5 = Section("4.1.5", "PCI-specific Initialization And Device Operation")
S_4_1_5_1 = Section("4.1.5.1", "Device Initialization")
S_4_1_5_1_2 = Section("4.1.5.1.2", "MSI-X Vector Configuration")
_PCI_OP = f"{_PCI} / PCI-specific Initialization And Device Operation"
S_4_1_5_1_2_1 = _dev(
    "4.1.5.1.2.1",
    "MSI-X Vector Configuration",
    f"{_PCI_OP} / Device Initialization / MSI-X Vector Configuration",
)
S_4_1_5_1_2_2 = _drv(
    "4.1.5.1.2.2",
    "MSI-X Vector Configuration",
    f"{_PCI_OP} / Device Initialization / MSI-X Vector Configuration",
)
S_4_1_5_1_3 = Section("4.1.5.1.3", "Virtqueue Configuration")
S_4_1_5_2 = Section("4.1.5.2", "Available Buffer Notifications")
S_4_1_5_2_1 = _drv(
    "4.1.5.2.1", "Available Buffer Notifications", f"{_PCI_OP} / Available Buffer Notifications"
)
S_4_1_5_3 = Section("4.1.5.3", "Used Buffer Notifications")
S_4_1_5_3_1 = _dev(
    "4.1.5.3.1", "Used Buffer Notifications", f"{_PCI_OP} / Used Buffer Notifications"
)
S_4_1_5_4 = Section("4.1.5.4", "Notification of Device Configuration Changes")
S_4_1_5_4_1 = _dev(
    "4.1.5.4.1",
    "Notification of Device Configuration Changes",
    f"{_PCI_OP} / Notification of Device Configuration Changes",
)
S_4_1_5_5 = Section("4.1.5.5", "Driver Handling Interrupts")
S_4_2 = Section("4.2", "Virtio Over MMIO")
S_4_2_1 = Section("4.2.1", "MMIO Device Discovery")
S_4_2_2 = Section("4.2.2", "MMIO Device Register Layout")
S_4_2_2_1 = _dev("4.2.2.1", "MMIO Device Register Layout", f"{_MMIO} / MMIO Device Register Layout")
S_4_2_2_2 = _drv("4.2.2.2", "MMIO Device Register Layout", f"{_MMIO} / MMIO Device Register Layout")
S_4_2_3 = Section("4.2.3", "MMIO-specific Initialization And Device Operation")
S_4_2_3_1 = Section("4.2.3.1", "Device Initialization")
S_4_2_3_1_1 = _drv(
    "4.2.3.1.1",
    "Device Initialization",
    f"{_MMIO} / MMIO-specific Initialization And Device Operation / Device Initialization",
)
S_4_2_3_2 = Section("4.2.3.2", "Virtqueue Configuration")
S_4_2_3_3 = Section("4.2.3.3", "Available Buffer Notifications")
S_4_2_3_4 = Section("4.2.3.4", "Notifications From The Device")
S_4_2_3_4_1 = _drv(
    "4.2.3.4.1",
    "Notifications From The Device",
    f"{_MMIO} / MMIO-specific Initialization And Device Operation / Notifications From The Device",
)
S_4_2_4 = Section("4.2.4", "Legacy interface")
S_4_2_5 = Section("4.2.5", "Features reserved for future use")
S_4_3 = Section("4.3", "Virtio Over Channel I/O")

# --- Chapter 5: Device Types ---------------------------------------------------------
S_5 = Section("5", "Device Types")

# 5.1 Network Device
S_5_1 = Section("5.1", "Network Device")
S_5_1_1 = Section("5.1.1", "Device ID")
S_5_1_2 = Section("5.1.2", "Virtqueues")
S_5_1_3 = Section("5.1.3", "Feature bits")
S_5_1_3_1 = Section("5.1.3.1", "Feature bit requirements")
S_5_1_3_2 = Section("5.1.3.2", "Legacy Interface: Feature bits")
S_5_1_4 = Section("5.1.4", "Device configuration layout")
S_5_1_4_1 = _dev("5.1.4.1", "Device configuration layout", f"{_NET} / Device configuration layout")
S_5_1_4_2 = _drv("5.1.4.2", "Device configuration layout", f"{_NET} / Device configuration layout")
S_5_1_4_3 = Section("5.1.4.3", "Legacy Interface: Device configuration layout")
S_5_1_5 = Section("5.1.5", "Device Initialization")
S_5_1_6 = Section("5.1.6", "Device and driver capabilities")
S_5_1_7 = Section("5.1.7", "Device resource objects")
S_5_1_8 = Section("5.1.8", "Device parts")
S_5_1_9 = Section("5.1.9", "Device Operation")
S_5_1_9_1 = Section("5.1.9.1", "Legacy Interface: Device Operation")
S_5_1_9_2 = Section("5.1.9.2", "Packet Transmission")
S_5_1_9_2_1 = _drv(
    "5.1.9.2.1", "Packet Transmission", f"{_NET} / Device Operation / Packet Transmission"
)
S_5_1_9_2_2 = _dev(
    "5.1.9.2.2", "Packet Transmission", f"{_NET} / Device Operation / Packet Transmission"
)
S_5_1_9_3 = Section("5.1.9.3", "Setting Up Receive Buffers")
S_5_1_9_3_1 = _drv(
    "5.1.9.3.1",
    "Setting Up Receive Buffers",
    f"{_NET} / Device Operation / Setting Up Receive Buffers",
)
S_5_1_9_3_2 = _dev(
    "5.1.9.3.2",
    "Setting Up Receive Buffers",
    f"{_NET} / Device Operation / Setting Up Receive Buffers",
)
S_5_1_9_4 = Section("5.1.9.4", "Processing of Incoming Packets")
S_5_1_9_4_1 = _dev(
    "5.1.9.4.1",
    "Processing of Incoming Packets",
    f"{_NET} / Device Operation / Processing of Incoming Packets",
)
S_5_1_9_4_2 = _drv(
    "5.1.9.4.2",
    "Processing of Incoming Packets",
    f"{_NET} / Device Operation / Processing of Incoming Packets",
)
S_5_1_9_4_3 = Section("5.1.9.4.3", "Hash calculation for incoming packets")
S_5_1_9_4_4 = Section("5.1.9.4.4", "Inner Header Hash")
S_5_1_9_4_5 = Section("5.1.9.4.5", "Hash reporting for incoming packets")
S_5_1_9_5 = Section("5.1.9.5", "Control Virtqueue")
S_5_1_9_5_1 = Section("5.1.9.5.1", "Packet Receive Filtering")
S_5_1_9_5_2 = Section("5.1.9.5.2", "Setting MAC Address Filtering")
S_5_1_9_5_3 = Section("5.1.9.5.3", "VLAN Filtering")
S_5_1_9_5_4 = Section("5.1.9.5.4", "Gratuitous Packet Sending")
S_5_1_9_5_5 = Section("5.1.9.5.5", "Device operation in multiqueue mode")
S_5_1_9_5_6 = Section("5.1.9.5.6", "Automatic receive steering in multiqueue mode")
S_5_1_9_5_7 = Section("5.1.9.5.7", "Receive-side scaling (RSS)")
S_5_1_9_5_8 = Section("5.1.9.5.8", "RSS Context")
S_5_1_9_5_9 = Section("5.1.9.5.9", "Offloads State Configuration")
S_5_1_9_5_10 = Section("5.1.9.5.10", "Notifications Coalescing")
S_5_1_9_5_11 = Section("5.1.9.5.11", "Device Statistics")
S_5_1_9_6 = Section("5.1.9.6", "Flow filter")
S_5_1_9_6_1 = Section("5.1.9.6.1", "Packet processing order")
S_5_1_9_6_2 = Section("5.1.9.6.2", "Device and driver capabilities")
S_5_1_9_6_3 = Section("5.1.9.6.3", "Resource objects")
S_5_1_9_6_4 = _dev("5.1.9.6.4", "Flow filter", f"{_NET} / Device Operation / Flow filter")
S_5_1_9_6_5 = _drv("5.1.9.6.5", "Flow filter", f"{_NET} / Device Operation / Flow filter")
S_5_1_9_7 = Section("5.1.9.7", "IPsec Operation")
S_5_1_9_7_1 = Section("5.1.9.7.1", "Packet processing order")
S_5_1_9_7_2 = Section("5.1.9.7.2", "Device and driver capabilities")
S_5_1_9_7_3 = Section("5.1.9.7.3", "Resource objects")
S_5_1_9_7_4 = _dev("5.1.9.7.4", "IPsec Operation", f"{_NET} / Device Operation / IPsec Operation")
S_5_1_9_7_5 = _drv("5.1.9.7.5", "IPsec Operation", f"{_NET} / Device Operation / IPsec Operation")
S_5_1_9_8 = Section("5.1.9.8", "Legacy Interface: Framing Requirements")

# 5.2 Block Device
S_5_2 = Section("5.2", "Block Device")
S_5_2_1 = Section("5.2.1", "Device ID")
S_5_2_2 = Section("5.2.2", "Virtqueues")
S_5_2_3 = Section("5.2.3", "Feature bits")
S_5_2_3_1 = Section("5.2.3.1", "Legacy Interface: Feature bits")
S_5_2_4 = Section("5.2.4", "Device configuration layout")
S_5_2_4_1 = Section("5.2.4.1", "Legacy Interface: Device configuration layout")
S_5_2_5 = Section("5.2.5", "Device Initialization")
S_5_2_5_1 = _drv("5.2.5.1", "Device Initialization", f"{_BLK} / Device Initialization")
S_5_2_5_2 = _dev("5.2.5.2", "Device Initialization", f"{_BLK} / Device Initialization")
S_5_2_5_3 = Section("5.2.5.3", "Legacy Interface: Device Initialization")
S_5_2_6 = Section("5.2.6", "Device Operation")
S_5_2_6_1 = _drv("5.2.6.1", "Device Operation", f"{_BLK} / Device Operation")
S_5_2_6_2 = _dev("5.2.6.2", "Device Operation", f"{_BLK} / Device Operation")
S_5_2_6_3 = Section("5.2.6.3", "Legacy Interface: Device Operation")
S_5_2_6_4 = Section("5.2.6.4", "Legacy Interface: Framing Requirements")

# 5.4 Entropy Device
S_5_4 = Section("5.4", "Entropy Device")
S_5_4_1 = Section("5.4.1", "Device ID")
S_5_4_2 = Section("5.4.2", "Virtqueues")
S_5_4_3 = Section("5.4.3", "Feature bits")
S_5_4_4 = Section("5.4.4", "Device configuration layout")
S_5_4_5 = Section("5.4.5", "Device Initialization")
S_5_4_6 = Section("5.4.6", "Device Operation")
S_5_4_6_1 = _drv("5.4.6.1", "Device Operation", f"{_RNG} / Device Operation")
S_5_4_6_2 = _dev("5.4.6.2", "Device Operation", f"{_RNG} / Device Operation")

# 5.8 Input Device
S_5_8 = Section("5.8", "Input Device")
S_5_8_1 = Section("5.8.1", "Device ID")
S_5_8_2 = Section("5.8.2", "Virtqueues")
S_5_8_3 = Section("5.8.3", "Feature bits")
S_5_8_4 = Section("5.8.4", "Device configuration layout")
S_5_8_5 = Section("5.8.5", "Device Initialization")
S_5_8_5_1 = _drv("5.8.5.1", "Device Initialization", f"{_INPUT} / Device Initialization")
S_5_8_5_2 = _dev("5.8.5.2", "Device Initialization", f"{_INPUT} / Device Initialization")
S_5_8_6 = Section("5.8.6", "Device Operation")
S_5_8_6_1 = _drv("5.8.6.1", "Device Operation", f"{_INPUT} / Device Operation")
S_5_8_6_2 = _dev("5.8.6.2", "Device Operation", f"{_INPUT} / Device Operation")

# --- Chapter 6: Reserved Feature Bits -----------------------------------------------
S_6 = Section("6", "Reserved Feature Bits")
S_6_1 = _drv("6.1", "Reserved Feature Bits", "Reserved Feature Bits")
S_6_2 = _dev("6.2", "Reserved Feature Bits", "Reserved Feature Bits")
S_6_3 = Section("6.3", "Legacy Interface: Reserved Feature Bits")


def all_sections() -> dict[str, Section]:
    """Every ``S_*`` constant of this module, by constant name, in definition order."""
    return {name: value for name, value in globals().items() if name.startswith("S_")}
