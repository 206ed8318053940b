"""Conditioning: the Conditioner and its embedders (text, class, size, spatial maps)."""
