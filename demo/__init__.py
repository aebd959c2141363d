"""The demo: fastsave next to libvirt's managed save (run: bash demo/run)."""
