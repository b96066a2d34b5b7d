"""PCI in the emulator: a host bridge with configuration mechanism #1 (``host.py``),
type-0 functions with memory BARs, INTx and MSI delivery (``function.py``), and
virtio-pci devices on it (``virtio.py``: the workload paths and ``add_virtio_pci``)."""
