"""What `clv inspect` prints: the cleaning report and a profile of the kept transactions."""

from __future__ import annotations

from typing import Any

import pandas as pd

from features.aggregate import line_cents
from features.cleaning import CleaningReport


def profile(lines: pd.DataFrame, report: CleaningReport) -> dict[str, Any]:
    spend = line_cents(lines["quantity"].to_numpy(), lines["unit_price"].to_numpy()) / 100.0
    per_customer = pd.Series(spend, index=lines.index).groupby(lines["customer_id"]).sum()
    quantiles = per_customer.quantile([0.1, 0.25, 0.5, 0.75, 0.9, 0.99]) if len(per_customer) else None
    return {
        "cleaning": report.as_dict(),
        "customers": int(lines["customer_id"].nunique()),
        "invoices": int(lines[["customer_id", "invoice_no"]].drop_duplicates().shape[0]),
        "first_ts": lines["ts"].min().isoformat() if len(lines) else None,
        "last_ts": lines["ts"].max().isoformat() if len(lines) else None,
        "total_spend": round(float(spend.sum()), 2),
        "spend_per_customer": {
            "mean": round(float(per_customer.mean()), 2) if len(per_customer) else 0.0,
            **({f"p{int(q * 100)}": round(float(v), 2) for q, v in quantiles.items()} if quantiles is not None else {}),
            "max": round(float(per_customer.max()), 2) if len(per_customer) else 0.0,
        },
        "customers_with_returns": int(lines.loc[lines["quantity"] < 0, "customer_id"].nunique()),
    }


def render(p: dict[str, Any]) -> str:
    c = p["cleaning"]
    out = [
        f"format            {c['format']}",
        f"rows read         {c['rows_read']:,}",
        f"rows kept         {c['rows_kept']:,}",
        f"rows dropped      {c['rows_read'] - c['rows_kept']:,}",
    ]
    out += [f"  {name:<22}{n:,}" for name, n in c["dropped"].items() if n]
    out += [
        f"cancellation lines kept (returns) {c['cancellation_lines']:,}",
        f"duplicate lines   {c['duplicate_lines']:,} ({c['policy']['duplicates']})",
        f"outlier policy    |quantity| > {c['policy']['outlier_quantity']} dropped"
        if c["policy"]["outlier_quantity"] is not None
        else "outlier policy    keep all",
        f"customers         {p['customers']:,}",
        f"invoices          {p['invoices']:,}",
        f"date range        {p['first_ts']} .. {p['last_ts']}",
        f"total spend       {p['total_spend']:,.2f}",
        "spend/customer    " + "  ".join(f"{k} {v:,.2f}" for k, v in p["spend_per_customer"].items()),
    ]
    out += [f"note: {n}" for n in c["notes"]]
    return "\n".join(out)
