"""Spec sections cited by the machine-readable spec (virtio 1.4 CS01 numbering)."""

from __future__ import annotations

from virtio.spec._base import Section

S_2_6 = Section("2.6", "Virtqueues")
S_2_7 = Section("2.7", "Split Virtqueues")
S_2_7_5 = Section("2.7.5", "The Virtqueue Descriptor Table")
S_2_7_5_3 = Section("2.7.5.3", "Indirect Descriptors")
S_2_7_6 = Section("2.7.6", "The Virtqueue Available Ring")
S_2_7_7 = Section("2.7.7", "Used Buffer Notification Suppression")
S_2_7_8 = Section("2.7.8", "The Virtqueue Used Ring")
S_2_7_10 = Section("2.7.10", "Available Buffer Notification Suppression")
S_2_8 = Section("2.8", "Packed Virtqueues")
S_2_8_13 = Section("2.8.13", "Packed Virtqueue Layout")
S_2_8_14 = Section("2.8.14", "Event Suppression Structure Format")
