"""Weight files and where pretrained weights come from; imports nothing else of ldm (the floor of the house)."""
