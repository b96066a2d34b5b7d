"""Small KVM / unicorn VMM for counting vmexits of emulated vs paravirtual I/O."""
