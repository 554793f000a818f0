"""Adapters for other frameworks (each optional: its package is imported only when the adapter is used).

* :mod:`gtp_kernels.integrations.trak` - a TRAK projector (``TRAKer(..., projector=...)``) running K1.
* :mod:`gtp_kernels.integrations.dattri` - the same projector with dattri's interface and scale.
* :mod:`gtp_kernels.integrations.bergson` - bergson gradient indexes (one per checkpoint) into a store.
* :mod:`gtp_kernels.integrations.less` - ``gtp less-select``: LESS gradient folders in, LESS selection files out.
"""
