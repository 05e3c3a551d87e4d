"""VMM backends behind one small interface (see base.Vmm)."""
