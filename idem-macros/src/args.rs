//! The options of `#[idempotent(...)]`: parsed in one place, turned into typed values here,
//! every mistake reported on the token that holds it.

use proc_macro2::{TokenStream, TokenTree};
use syn::meta::ParseNestedMeta;
use syn::parse::{ParseStream, Parser};
use syn::{Expr, ExprLit, Lit, LitStr, Path, Token, Type};

use crate::Errors;

/// The longest ttl a store can keep: Redis counts expiry in signed milliseconds.
const MAX_TTL_SECS: u64 = i64::MAX as u64 / 1000;

const ACCEPTED: &str =
    "accepted options: `ttl = \"24h\"`, `required = true`, `state = AppState`, `crate = \"idem\"`";

const TTL_FORMS: &str = "expected `ttl = \"24h\"`-style duration (s, m, h, d): a whole number and a unit, or several units largest first, as in \"90s\", \"15m\", \"1h30m\", \"7d\"";

/// The options of one `#[idempotent(...)]`, defaults filled in.
pub(crate) struct Options {
    /// How long the response is kept, in seconds; at least 1.
    /// The ttl in seconds; `None` for idem's default.
    pub(crate) ttl_secs: Option<u64>,
    /// Whether a request without a key is refused with 400.
    pub(crate) required: bool,
    /// The router's state type, named by the user, for the extractor checks.
    pub(crate) state: Option<Type>,
    /// The path of idem-runtime in the user's crate, where it is not `::idem_runtime`.
    pub(crate) krate: Option<Path>,
}

impl Options {
    /// Parses the attribute's arguments, reporting every bad option at once.
    pub(crate) fn parse(args: TokenStream) -> syn::Result<Self> {
        let mut ttl = Once::new("ttl");
        let mut required = Once::new("required");
        let mut state = Once::new("state");
        let mut krate = Once::new("crate");
        let mut errors = Errors::default();
        let parser = syn::meta::parser(|meta| {
            if meta.path.is_ident("ttl") {
                if let Some(secs) = parse_ttl(&meta, &mut errors)? {
                    ttl.set(&meta, secs, &mut errors);
                }
            } else if meta.path.is_ident("required") {
                if let Some(value) = parse_required(&meta, &mut errors)? {
                    required.set(&meta, value, &mut errors);
                }
            } else if meta.path.is_ident("state") {
                if let Some(value) = parse_state(&meta, &mut errors)? {
                    state.set(&meta, value, &mut errors);
                }
            } else if meta.path.is_ident("crate") {
                if let Some(value) = parse_crate(&meta, &mut errors)? {
                    krate.set(&meta, value, &mut errors);
                }
            } else {
                let name = quote::ToTokens::to_token_stream(&meta.path).to_string();
                errors.push(meta.error(format_args!("unknown option `{name}`; {ACCEPTED}")));
                skip_value(meta.input)?;
            }
            Ok(())
        });
        if let Err(error) = parser.parse2(args) {
            errors.push(error);
        }
        errors.into_result()?;
        Ok(Self {
            ttl_secs: ttl.value,
            required: required.value.unwrap_or(false),
            state: state.value,
            krate: krate.value,
        })
    }
}

/// An option that may be given at most once.
struct Once<T> {
    name: &'static str,
    value: Option<T>,
}

impl<T> Once<T> {
    fn new(name: &'static str) -> Self {
        Self { name, value: None }
    }

    fn set(&mut self, meta: &ParseNestedMeta<'_>, value: T, errors: &mut Errors) {
        if self.value.is_some() {
            errors.push(syn::Error::new_spanned(
                &meta.path,
                format_args!("`{}` is given twice; keep one", self.name),
            ));
        } else {
            self.value = Some(value);
        }
    }
}

/// `ttl = "1h30m"` as seconds. `Ok(None)` once the mistake is recorded in `errors`.
fn parse_ttl(meta: &ParseNestedMeta<'_>, errors: &mut Errors) -> syn::Result<Option<u64>> {
    let Some(value) = value_expr(meta, "ttl = \"24h\"", errors)? else {
        return Ok(None);
    };
    let literal = match value {
        Expr::Lit(ExprLit {
            lit: Lit::Str(literal),
            ..
        }) => literal,
        Expr::Lit(ExprLit {
            lit: Lit::Int(number),
            ..
        }) => {
            errors.push(syn::Error::new_spanned(
                &number,
                format_args!(
                    "write the ttl as a string with its unit, such as `ttl = \"{}s\"`; units: s, m, h, d",
                    number.base10_digits()
                ),
            ));
            return Ok(None);
        }
        other => {
            errors.push(syn::Error::new_spanned(
                other,
                "`ttl` takes a string literal such as `ttl = \"24h\"`: the duration is checked when the handler compiles, so a constant or an expression cannot be used",
            ));
            return Ok(None);
        }
    };
    match parse_duration(&literal.value()) {
        Ok(secs) => Ok(Some(secs)),
        Err(message) => {
            errors.push(syn::Error::new(literal.span(), message));
            Ok(None)
        }
    }
}

/// `required = true`.
fn parse_required(meta: &ParseNestedMeta<'_>, errors: &mut Errors) -> syn::Result<Option<bool>> {
    let Some(value) = value_expr(meta, "required = true", errors)? else {
        return Ok(None);
    };
    match value {
        Expr::Lit(ExprLit {
            lit: Lit::Bool(flag),
            ..
        }) => Ok(Some(flag.value)),
        Expr::Lit(ExprLit {
            lit: Lit::Str(text),
            ..
        }) if matches!(text.value().as_str(), "true" | "false") => {
            errors.push(syn::Error::new_spanned(
                &text,
                format_args!(
                    "`required` takes `true` or `false` without quotes: `required = {}`",
                    text.value()
                ),
            ));
            Ok(None)
        }
        other => {
            errors.push(syn::Error::new_spanned(
                other,
                "`required` takes a literal `true` or `false`: `required = true`",
            ));
            Ok(None)
        }
    }
}

/// `state = AppState`.
fn parse_state(meta: &ParseNestedMeta<'_>, errors: &mut Errors) -> syn::Result<Option<Type>> {
    if !meta.input.peek(Token![=]) {
        errors.push(meta.error("write the router's state type: `state = AppState`"));
        skip_value(meta.input)?;
        return Ok(None);
    }
    let input = meta.value()?;
    if input.is_empty() || input.peek(Token![,]) {
        errors.push(meta.error("write the router's state type: `state = AppState`"));
        return Ok(None);
    }
    if input.peek(LitStr) {
        let text: LitStr = input.parse()?;
        errors.push(syn::Error::new_spanned(
            &text,
            format_args!(
                "`state` takes a type, not a string: `state = {}`",
                text.value()
            ),
        ));
        return Ok(None);
    }
    input.parse().map(Some)
}

/// `crate = "idem"`: a path, in a string as serde and tokio take theirs.
fn parse_crate(meta: &ParseNestedMeta<'_>, errors: &mut Errors) -> syn::Result<Option<Path>> {
    const FORMS: &str = "`crate` takes the path of idem-runtime in a string: `crate = \"idem\"` where it is renamed `idem` in Cargo.toml, or the path of a re-export such as `crate = \"my_lib::idem\"`";
    let Some(value) = value_expr(meta, "crate = \"idem\"", errors)? else {
        return Ok(None);
    };
    let path = match &value {
        Expr::Lit(ExprLit {
            lit: Lit::Str(text),
            ..
        }) => text.parse::<Path>().ok().filter(|path| {
            path.segments
                .iter()
                .all(|segment| segment.arguments.is_none())
        }),
        _ => None,
    };
    match (&path, &value) {
        (Some(_), _) => {}
        (None, Expr::Path(unquoted)) => {
            let text = quote::ToTokens::to_token_stream(&unquoted.path)
                .to_string()
                .replace(' ', "");
            errors.push(syn::Error::new_spanned(
                &value,
                format_args!("`crate` takes the path in a string: `crate = \"{text}\"`"),
            ));
        }
        (None, _) => errors.push(syn::Error::new_spanned(&value, FORMS)),
    }
    Ok(path)
}

/// The expression after `name =`; a missing `=` is recorded in `errors` with the `usage`
/// to write instead.
fn value_expr(
    meta: &ParseNestedMeta<'_>,
    usage: &str,
    errors: &mut Errors,
) -> syn::Result<Option<Expr>> {
    if meta.input.peek(Token![=]) {
        return meta.value()?.parse().map(Some);
    }
    errors.push(meta.error(format_args!("expected `{usage}`")));
    skip_value(meta.input)?;
    Ok(None)
}

/// Skips what follows an option up to the next top-level comma, so that the options after a
/// bad one are still checked.
fn skip_value(input: ParseStream<'_>) -> syn::Result<()> {
    let mut angle_depth = 0_usize;
    while !input.is_empty() {
        if angle_depth == 0 && input.peek(Token![,]) {
            break;
        }
        match input.parse::<TokenTree>()? {
            TokenTree::Punct(punct) if punct.as_char() == '<' => angle_depth += 1,
            TokenTree::Punct(punct) if punct.as_char() == '>' => {
                angle_depth = angle_depth.saturating_sub(1);
            }
            _ => {}
        }
    }
    Ok(())
}

/// Seconds in `"1d12h"`, `"90s"`, `"1h 30m"`: whole numbers each followed by one unit of
/// d, h, m, s, the units largest first and each at most once.
fn parse_duration(text: &str) -> Result<u64, String> {
    const UNITS: [(char, u64); 4] = [('d', 86_400), ('h', 3_600), ('m', 60), ('s', 1)];
    let mut rest = text.trim_start();
    if rest.is_empty() {
        return Err(TTL_FORMS.to_owned());
    }
    let mut total: u64 = 0;
    let mut next_unit = 0;
    let too_long = || {
        format!(
            "ttl \"{text}\" is too long: the longest a store keeps is {}d",
            MAX_TTL_SECS / 86_400
        )
    };
    while !rest.is_empty() {
        let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        if digits == 0 {
            return Err(TTL_FORMS.to_owned());
        }
        let (number, after) = rest.split_at(digits);
        let number: u64 = number.parse().map_err(|_| too_long())?;
        let mut chars = after.chars();
        let unit = chars.next().ok_or_else(|| TTL_FORMS.to_owned())?;
        let position = UNITS[next_unit..]
            .iter()
            .position(|(name, _)| *name == unit)
            .ok_or_else(|| TTL_FORMS.to_owned())?;
        let (_, seconds) = UNITS[next_unit + position];
        next_unit += position + 1;
        total = number
            .checked_mul(seconds)
            .and_then(|part| total.checked_add(part))
            .ok_or_else(too_long)?;
        rest = chars.as_str().trim_start();
    }
    if total == 0 {
        return Err(format!(
            "ttl \"{text}\" is zero: a response must be kept at least one second, such as `ttl = \"24h\"`"
        ));
    }
    if total > MAX_TTL_SECS {
        return Err(too_long());
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_sum_their_units() {
        assert_eq!(parse_duration("24h"), Ok(86_400));
        assert_eq!(parse_duration("1h30m"), Ok(5_400));
        assert_eq!(parse_duration("1h 30m"), Ok(5_400));
        assert_eq!(parse_duration("90s"), Ok(90));
        assert_eq!(parse_duration("7d"), Ok(604_800));
        assert_eq!(parse_duration("1d2h3m4s"), Ok(93_784));
        assert_eq!(parse_duration("0h1s"), Ok(1));
    }

    #[test]
    fn malformed_durations_list_the_accepted_forms() {
        for text in [
            "", " ", "24", "h", "1x", "1h1h", "30m1h", "1.5h", "-1h", "1 h", "24H", "1hh",
        ] {
            assert_eq!(parse_duration(text), Err(TTL_FORMS.to_owned()), "{text:?}");
        }
    }

    #[test]
    fn zero_and_overflowing_durations_are_refused() {
        assert!(parse_duration("0s").is_err_and(|e| e.contains("zero")));
        assert!(parse_duration("0d0h").is_err_and(|e| e.contains("zero")));
        for text in [
            "99999999999999999999s",
            "18446744073709551615d",
            "106751991168d",
        ] {
            assert!(
                parse_duration(text).is_err_and(|e| e.contains("too long")),
                "{text}"
            );
        }
        assert_eq!(
            parse_duration(&format!("{MAX_TTL_SECS}s")),
            Ok(MAX_TTL_SECS)
        );
    }

    #[test]
    fn options_default_to_24h_and_not_required() -> syn::Result<()> {
        let options = Options::parse(TokenStream::new())?;
        assert_eq!(options.ttl_secs, None);
        assert!(!options.required);
        assert!(options.state.is_none());
        assert!(options.krate.is_none());
        Ok(())
    }

    #[test]
    fn every_bad_option_is_reported() {
        let args: TokenStream = syn::parse_quote! {
            ttl = "soon", colour = "red", required = 1, required = true, required = false
        };
        let Err(error) = Options::parse(args) else {
            panic!("bad options were accepted");
        };
        let messages: Vec<String> = error.into_iter().map(|e| e.to_string()).collect();
        assert_eq!(messages.len(), 4, "{messages:#?}");
        assert_eq!(messages[0], TTL_FORMS);
        assert!(messages[1].starts_with("unknown option `colour`"));
        assert!(messages[2].contains("`required = true`"));
        assert!(messages[3].contains("given twice"));
    }

    #[test]
    fn state_takes_a_type_with_generics() -> syn::Result<()> {
        let args: TokenStream = syn::parse_quote! { state = Shared<Db, Cache>, ttl = "1h" };
        let options = Options::parse(args)?;
        assert_eq!(options.ttl_secs, Some(3_600));
        assert!(options.state.is_some());
        Ok(())
    }

    #[test]
    fn crate_takes_a_path_in_a_string() -> syn::Result<()> {
        let args: TokenStream = syn::parse_quote! { crate = "::my_lib::idem" };
        let options = Options::parse(args)?;
        let path = options
            .krate
            .map(|path| quote::ToTokens::to_token_stream(&path).to_string());
        assert_eq!(path.as_deref(), Some(":: my_lib :: idem"));
        for args in [
            quote::quote! { crate = idem },
            quote::quote! { crate = "not a path" },
            quote::quote! { crate = "idem::<T>" },
            quote::quote! { crate },
        ] {
            let Err(error) = Options::parse(args.clone()) else {
                panic!("`{args}` was accepted");
            };
            assert!(error.to_string().contains("`crate = \"idem"), "{error}");
        }
        Ok(())
    }
}
