"""The emulated IDE disk of a firmware boot: ATA drive logic (ata.py) and
the PIIX3 IDE PCI function with its bus-master DMA (piix.py)."""
