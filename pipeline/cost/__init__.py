"""What a run costs: image and text token counts, prices, the budget, and the estimate.

Owns: `tokens` (the providers' image-token rules), `pricing` (`PriceTable`, `prices.json`),
`budget` (`Budget`, `Purse`), `estimate` (`annotate estimate`). Never: sending requests.
"""
