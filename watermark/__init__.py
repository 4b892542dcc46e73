"""White-box watermarks (WaterMAS, Uchida): embedding, attacks, extraction from deployed integers."""
