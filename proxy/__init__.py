"""hep-proxy: serve preloaded CVMFS stores (Stratum-1 layout) to worker nodes over HTTP."""
