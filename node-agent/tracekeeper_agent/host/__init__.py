"""Facts the agent reads from this host: kernel features, tracefs, ELF, process roots, BPF ids."""
