//! The `#[idempotent]` attribute of idem. Depend on `idem-runtime`, which re-exports it
//! as `idem_runtime::idempotent` and documents every option with examples.

mod args;
mod expand;

use proc_macro::TokenStream;

/// The attribute lives in `idem-macros`; depend on `idem-runtime` and use it as
/// `idem_runtime::idempotent`, where every option is documented with an example.
///
/// # What it generates
///
/// The signature keeps its arguments; the [`Idempotent`] extractor is taken together with
/// the last of them, so the handler keeps its arity and every other extractor
/// (authentication above all) runs before it (a handler without arguments takes the
/// extractor alone). The key is claimed in [`Idempotent::run`], once the last argument
/// (the body) has been extracted too. The body runs in an `async` block of the handler
/// itself, each argument bound to its pattern there, so `Self` and the generic parameters
/// of an enclosing `impl` stay in scope; the block's output is fixed to the declared return
/// type, so `return` and `?` work as in the handler. Its future is handed to
/// [`Idempotent::run`]:
///
/// ```text
/// #[idempotent(ttl = "1h", required = true)]
/// pub async fn create(State(db): State<Db>, Json(x): Json<X>) -> Result<Json<Y>, AppError> { body }
///
/// // becomes
///
/// pub async fn create(
///     __idem_arg0: State<Db>,
///     __idem_last: (::idem_runtime::Idempotent<3600, true>, Json<X>),
/// ) -> ::idem_runtime::__private::Response {
///     // compile-time checks that each argument is an extractor, spanned on its type
///     let (__idem_guard, __idem_arg1) = __idem_last;
///     // fixes the block's output type, so that `?` and `return` see the declared one
///     let __idem_body = ::idem_runtime::__private::declared_output::<Result<Json<Y>, AppError>, _>(async move {
///         let __idem_arg0 = __idem_arg0;
///         let State(db): State<Db> = __idem_arg0;
///         let __idem_arg1 = __idem_arg1;
///         let Json(x): Json<X> = __idem_arg1;
///         body
///     });
///     // the body's output as the response, by a combinator that holds the body once
///     let __idem_work = ::idem_runtime::__private::respond(__idem_body);
///     __idem_guard.run(__idem_work).await
/// }
/// ```
///
/// Around that shape:
///
/// - Every path starts at `::idem_runtime`, or at the path given as `crate = "..."`.
/// - An `impl Trait` in the return type is left to inference in the declared output
///   (`declared_output::<Result<_, AppError>, _>`), and the traits it names are the bounds
///   of an empty generic `fn __idem_traits<T0: Trait>() {}` (a name no lint reports), so
///   that an import used only by the return type stays used. Where a bound has generic
///   arguments (`impl Into<T>`), which may name parameters a nested `fn` cannot see, or
///   names a lifetime, the trait gets an `#[allow(unused_imports)] use Trait as _;`
///   instead.
/// - Nothing else is `#[allow]`ed, so a crate that `#![forbid]`s lints accepts the
///   expansion of a handler whose `impl Trait`s take no generic arguments.
/// - A type parameter gets `Send + 'static` where its own bounds are, inline or in the
///   `where` clause. A name the `where` clause bounds that the handler does not declare
///   (a type parameter of an enclosing `impl`, `where T: Send + 'static`) gets no bounds
///   (it may be a concrete type), but the types that name it are left to axum's check.
/// - An argument's attributes (`#[cfg]`, `#[cfg_attr]`, lint levels) go on its parameter
///   and its bindings, and its `cfg` condition on its check. Where the last arguments may
///   be configured out (`#[cfg(..)]`, or `#[cfg_attr(p, cfg(c))]`, read as
///   `any(not(p), c)`), the handler is generated once for each argument that may be the
///   last compiled in, under the `cfg` that selects it, so that the guard always shares
///   the real last argument's slot.
/// - `#[axum::debug_handler]` below the attribute stays on the generated handler, the one
///   axum is given, with the handler's state filled in where it names none.
/// - A `#[tracing::instrument]` below the attribute is moved above it (the attribute is
///   applied again below it), so that it sees the arguments and return type as written.
/// - Every generated name is a local at [`Span::mixed_site`], out of the body's reach, and
///   ends in a suffix hashed from the handler's tokens (left out above): rustc resolves a
///   binding's name to a constant, static or unit struct in scope before it makes a
///   binding, so a user's `const __idem_guard` would otherwise turn the `let` into a
///   pattern.
///
/// [`Span::mixed_site`]: proc_macro::Span::mixed_site
/// [`Idempotent`]: https://docs.rs/idem-runtime/latest/idem_runtime/struct.Idempotent.html
/// [`Idempotent::run`]: https://docs.rs/idem-runtime/latest/idem_runtime/struct.Idempotent.html#method.run
#[proc_macro_attribute]
pub fn idempotent(args: TokenStream, item: TokenStream) -> TokenStream {
    expand::idempotent(args.into(), item.into()).into()
}

/// Every error found in one invocation, so that a user fixes them in one pass.
#[derive(Default)]
struct Errors(Option<syn::Error>);

impl Errors {
    fn push(&mut self, error: syn::Error) {
        match &mut self.0 {
            Some(errors) => errors.combine(error),
            None => self.0 = Some(error),
        }
    }

    fn into_result(self) -> syn::Result<()> {
        self.0.map_or(Ok(()), Err)
    }
}
