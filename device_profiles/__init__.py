"""Device profiles and the catalogue of real device classes: issue 3."""
