//! Code generation: the handler keeps its name, attributes and arguments; its body runs
//! under the `Idempotent` guard.

use proc_macro2::{Literal, Span, TokenStream, TokenTree};
use quote::{ToTokens, quote, quote_spanned};
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use syn::visit_mut::{self, VisitMut};

use syn::{
    Attribute, FnArg, GenericArgument, GenericParam, Generics, Ident, ItemFn, Meta, PatType,
    PathArguments, PredicateType, ReturnType, Signature, Token, TraitBound, Type, TypeInfer,
    TypeParamBound, WherePredicate, parse_quote,
};

use crate::Errors;
use crate::args::Options;

/// Axum implements `Handler` for functions of up to 16 arguments.
const MAX_ARGUMENTS: usize = 16;

/// `#[idempotent(args)] item`; on any error, `item` unchanged next to the errors so that
/// IDEs keep resolving the handler.
pub(crate) fn idempotent(args: TokenStream, item: TokenStream) -> TokenStream {
    let options = Options::parse(args.clone());
    let function = syn::parse2::<ItemFn>(item.clone())
        .map_err(|_| not_a_function())
        .and_then(|function| {
            let mut errors = Errors::default();
            if let Err(error) = check_signature(&function.sig) {
                errors.push(error);
            }
            if let Err(error) = repeated_attribute(&function) {
                errors.push(error);
            }
            errors.into_result().map(|()| function)
        });
    match (options, function) {
        // Not a function axum could call: rustc's own errors on it as written say so.
        (_, Ok(function)) if function.sig.variadic.is_some() => item,
        (Ok(options), Ok(function)) => match instrument_first(&options, args, &function) {
            Some(reordered) => reordered,
            None => generate(&options, &function),
        },
        (options, function) => {
            let errors = options.err().into_iter().chain(function.err());
            let errors = errors.map(syn::Error::into_compile_error);
            quote!(#item #(#errors)*)
        }
    }
}

/// Whether `ty` is a path whose last segment is `name` (`Idempotent`, `idem::Idempotent<60>`).
fn names_type(ty: &Type, name: &str) -> bool {
    matches!(ty, Type::Path(path) if path.path.segments.last().is_some_and(|segment| segment.ident == name))
}

/// An error on a second `#[idempotent]` among the function's attributes.
fn repeated_attribute(function: &ItemFn) -> syn::Result<()> {
    match function.attrs.iter().find(|attr| {
        attr.path()
            .segments
            .last()
            .is_some_and(|segment| segment.ident == "idempotent")
    }) {
        Some(attr) => Err(syn::Error::new_spanned(
            attr,
            "`#[idempotent]` is applied twice: remove one (each would guard the same key)",
        )),
        None => Ok(()),
    }
}

fn not_a_function() -> syn::Error {
    syn::Error::new(
        Span::call_site(),
        "`#[idempotent]` goes on an axum handler: an `async fn` with extractor arguments",
    )
}

fn check_signature(sig: &Signature) -> syn::Result<()> {
    let mut errors = Errors::default();
    if sig.asyncness.is_none() {
        errors.push(syn::Error::new_spanned(
            sig.fn_token,
            "`#[idempotent]` handlers must be `async`: write `async fn`",
        ));
    }
    for input in &sig.inputs {
        if let FnArg::Receiver(receiver) = input {
            errors.push(syn::Error::new_spanned(
                receiver,
                "`#[idempotent]` cannot take `self`: an axum handler is a free function; \
                 move it out of the `impl` and take what it needs as extractors, such as `State<AppState>`",
            ));
        }
    }
    for input in &sig.inputs {
        if let FnArg::Typed(argument) = input
            && names_type(&argument.ty, "Idempotent")
        {
            errors.push(syn::Error::new_spanned(
                &argument.ty,
                "`#[idempotent]` already takes the `Idempotent` guard: drop this argument \
                 (read the key with `ScopedKey`), or drop the attribute and call `run` yourself",
            ));
        }
    }
    // Arguments under `#[cfg]` may be configured out: only the others surely count.
    let unconditional = sig.inputs.iter().filter(|input| match input {
        FnArg::Typed(argument) => cfg_condition(&argument.attrs).is_none(),
        FnArg::Receiver(_) => true,
    });
    if let Some(extra) = unconditional.clone().nth(MAX_ARGUMENTS) {
        errors.push(syn::Error::new_spanned(
            extra,
            "axum handlers take at most 16 arguments; group some into a struct that implements `FromRequestParts`",
        ));
    }
    errors.into_result()
}

/// The handler with `#[tracing::instrument]` moved above this attribute, which is applied
/// again below it; `None` without one. `instrument` reads the handler's arguments (`skip`,
/// `fields`) and its return type (`err`, `ret`), so it must see the handler as written,
/// as it does when placed above this attribute.
fn instrument_first(
    options: &Options,
    args: TokenStream,
    function: &ItemFn,
) -> Option<TokenStream> {
    let (instrument, rest): (Vec<Attribute>, Vec<Attribute>) =
        function.attrs.iter().cloned().partition(|attr| {
            attr.path()
                .segments
                .last()
                .is_some_and(|segment| segment.ident == "instrument")
        });
    if instrument.is_empty() {
        return None;
    }
    let root = root(options);
    let function = ItemFn {
        attrs: rest,
        ..function.clone()
    };
    Some(quote!(#(#instrument)* #[#root::idempotent(#args)] #function))
}

fn generate(options: &Options, function: &ItemFn) -> TokenStream {
    let arguments: Vec<&PatType> = function
        .sig
        .inputs
        .iter()
        .filter_map(|input| match input {
            FnArg::Typed(argument) => Some(argument),
            FnArg::Receiver(_) => None,
        })
        .collect();
    let state = match &options.state {
        Some(state) => Some(RouterState::Named(state.to_token_stream())),
        None => state_from_arguments(&arguments),
    };
    // The guard shares the slot of the last argument compiled in. Where the last arguments
    // carry `#[cfg]`, only the compiler knows which one that is: the handler is generated
    // once for each, under the `cfg` that selects it.
    let conditions: Vec<Option<TokenStream>> = arguments
        .iter()
        .map(|argument| cfg_condition(&argument.attrs))
        .collect();
    let unconditional = conditions
        .iter()
        .rposition(Option::is_none)
        .map_or(0, |index| index + 1);
    if unconditional == arguments.len() {
        return handler(options, function, state.as_ref(), &arguments, None);
    }
    (unconditional..=arguments.len())
        .map(|taken| {
            let on = conditions[unconditional..taken]
                .last()
                .into_iter()
                .flatten();
            let off = conditions[taken..].iter().flatten();
            let selected = quote!(#[cfg(all(#(#on,)* not(any(#(#off),*))))]);
            handler(
                options,
                function,
                state.as_ref(),
                &arguments[..taken],
                Some(selected),
            )
        })
        .collect()
}

/// The condition under which an argument is compiled in: `all(a, b)` of its
/// `#[cfg(a)] #[cfg(b)]`, with `any(not(p), c)` for a `#[cfg_attr(p, cfg(c))]`; `None`
/// where no attribute configures it out.
fn cfg_condition(attrs: &[Attribute]) -> Option<TokenStream> {
    let predicates: Vec<TokenStream> = attrs
        .iter()
        .filter_map(|attr| meta_condition(&attr.meta))
        .collect();
    (!predicates.is_empty()).then(|| quote!(all(#(#predicates),*)))
}

/// The condition `meta`, an attribute's content, puts on what it is written on.
fn meta_condition(meta: &Meta) -> Option<TokenStream> {
    let Meta::List(list) = meta else {
        return None;
    };
    if list.path.is_ident("cfg") {
        return Some(list.tokens.clone());
    }
    if !list.path.is_ident("cfg_attr") {
        return None;
    }
    // The predicate is kept as tokens: it may be a literal (`true`), which no `Meta` is.
    let mut parts = split_commas(list.tokens.clone()).into_iter();
    let predicate = parts.next()?;
    let inner: Vec<TokenStream> = parts
        .filter_map(|attr| syn::parse2::<Meta>(attr).ok())
        .filter_map(|meta| meta_condition(&meta))
        .collect();
    (!inner.is_empty()).then(|| quote!(any(not(#predicate), all(#(#inner),*))))
}

/// `tokens` split at their top-level commas, empty parts left out.
fn split_commas(tokens: TokenStream) -> Vec<TokenStream> {
    let mut parts = vec![TokenStream::new()];
    for token in tokens {
        match &token {
            TokenTree::Punct(punct) if punct.as_char() == ',' => parts.push(TokenStream::new()),
            _ => parts
                .last_mut()
                .into_iter()
                .for_each(|part| part.extend([token.clone()])),
        }
    }
    parts.retain(|part| !part.is_empty());
    parts
}

/// The handler taking `arguments`, compiled in under `selected`: all the arguments, or,
/// where the last ones carry `#[cfg]`, those up to one of them.
fn handler(
    options: &Options,
    function: &ItemFn,
    state: Option<&RouterState>,
    arguments: &[&PatType],
    selected: Option<TokenStream>,
) -> TokenStream {
    let ItemFn {
        attrs,
        vis,
        sig,
        block,
    } = function;
    let Signature {
        constness,
        asyncness,
        unsafety,
        abi,
        fn_token,
        ident,
        generics,
        output,
        ..
    } = sig;

    let root = root(options);
    let at_name = ident.span();
    let locals = Locals::new(function);
    let guard = locals.name("__idem_guard", at_name);
    let first = locals.name("__idem_last", at_name);
    let body = locals.name("__idem_body", at_name);
    let work = locals.name("__idem_work", at_name);
    let names: Vec<Ident> = (0..arguments.len())
        .map(|index| locals.name(&format!("__idem_arg{index}"), at_name))
        .collect();

    // Without a ttl the guard keeps the runtime's default, written in one place there.
    let required = options.required;
    let guard_type = match options.ttl_secs {
        Some(secs) => {
            let ttl = Literal::u64_unsuffixed(secs);
            quote!(#root::Idempotent<#ttl, #required>)
        }
        None if required => {
            quote!(#root::Idempotent<{ #root::__private::DEFAULT_TTL_SECS }, true>)
        }
        None => quote!(#root::Idempotent),
    };
    // The guard shares the last argument's slot (`Guarded`), so that the handler keeps its
    // arity (`#[axum::debug_handler]` above this attribute calls it with the user's argument
    // count) and every other extractor, authentication included, runs before it, the last
    // one too where it reads only the head: a request they reject never reaches idem. The guard claims nothing when extracted; the claim is
    // made in `run`, once the body extractor has accepted the request too.
    let (params, unpack) = match (arguments.split_last(), names.split_last()) {
        (Some((last, init)), Some((last_name, init_names))) => {
            let last_type = &last.ty;
            let init = init.iter().zip(init_names).map(|(argument, name)| {
                let PatType { attrs, ty, .. } = argument;
                quote!(#(#attrs)* #name: #ty)
            });
            (
                quote!(#(#init,)* #first: #root::__private::Guarded<#guard_type, #last_type>),
                quote!(let #root::__private::Guarded(#guard, #last_name) = #first;),
            )
        }
        _ => (quote!(#guard: #guard_type), TokenStream::new()),
    };
    // Each argument is moved into the body's future, then bound to its pattern as written,
    // as rustc lowers an `async fn`: an argument bound to `_` still lives to the end.
    let bindings = arguments.iter().zip(&names).map(|(argument, name)| {
        let PatType { attrs, pat, ty, .. } = argument;
        quote!(#(#attrs)* let #name = #name; #(#attrs)* let #pat: #ty = #name;)
    });

    let outer_generics = send_static(generics);
    let where_clause = &outer_generics.where_clause;
    let return_start = match output {
        ReturnType::Type(_, ty) => span_range(ty).0,
        ReturnType::Default => at_name,
    };
    let response = quote_spanned!(return_start=> #root::__private::Response);
    let (trait_uses, declared) = declared_output(output, generics, &locals, at_name);
    // The block's statements go in the async block itself: a block alone in it would be
    // `unused_braces` where there are no bindings.
    let statements = &block.stmts;
    let run_body = quote! {
        async move {
            #(#bindings)*
            #(#statements)*
        }
    };
    // The output is fixed where the async block is written: rustc takes it from the
    // expected type there, and only there.
    let run_body = match declared {
        Some(ty) => quote!(#root::__private::declared_output::<#ty, _>(#run_body)),
        None => run_body,
    };
    let checks = extractor_checks(&root, state, generics, arguments);
    // Spanned on the return type, so that rustc reports a value that is no response there
    // rather than on the attribute.
    let at_return = Span::mixed_site().located_at(return_start);
    // The body's output becomes the response by a combinator, not in an `async` block,
    // which would hold the body's future twice. The body is named where the return type
    // is written, so that rustc reports an output that is no response there.
    let body_at_return = locals.name("__idem_body", return_start);
    let respond = quote_spanned!(at_return=> #root::__private::respond(#body_at_return));
    let run = quote_spanned!(at_name=> #guard.run(#work).await);
    // `debug_handler` below this attribute checks the handler axum is given: this one.
    let attrs = attrs
        .iter()
        .map(|attr| debug_handler_with_state(attr, state));

    quote! {
        #selected
        #(#attrs)*
        #vis #constness #asyncness #unsafety #abi #fn_token #ident #outer_generics (#params) -> #response
        #where_clause
        {
            #(#checks)*
            #unpack
            #trait_uses
            // The body runs in an async block of the handler itself, not in a function of
            // its own, so that `Self` and the generic parameters of an enclosing `impl`
            // stay in scope; `return` leaves this block with the handler's value.
            let #body = #run_body;
            let #work = #respond;
            #run
        }
    }
}

/// The path the expansion reaches idem-runtime by: `crate = ".."`, or `::idem_runtime`.
fn root(options: &Options) -> TokenStream {
    options
        .krate
        .as_ref()
        .map_or_else(|| quote!(::idem_runtime), ToTokens::to_token_stream)
}

/// The names the generated code binds. Mixed-site spans hide them from the user's code,
/// but a pattern still resolves to an item in scope: a user's `const __idem_guard` would
/// turn `let __idem_guard = ..` into a match against it. So each name carries a suffix
/// drawn from the handler's own tokens, which no item of the user's shares by accident.
struct Locals {
    suffix: u64,
}

impl Locals {
    fn new(function: &ItemFn) -> Self {
        let mut hasher = DefaultHasher::new();
        function.to_token_stream().to_string().hash(&mut hasher);
        Locals {
            suffix: hasher.finish(),
        }
    }

    /// A binding of the generated code, invisible to the user's code, reported at `at`.
    fn name(&self, stem: &str, at: Span) -> Ident {
        Ident::new(
            &format!("{stem}_{:016x}", self.suffix),
            Span::mixed_site().located_at(at),
        )
    }
}

/// What keeps the handler's declared return type in force on its body, which the
/// generated handler returns as a `Response`:
/// - an item naming each trait an `impl Trait` in the return type names, so that imports
///   used only there stay used: a function with those bounds, which no lint reports, or,
///   where a bound names the handler's generics or a lifetime (a nested function cannot),
///   a `use` of the trait;
/// - a statement that fixes the body's output to the declared type, so that `?` converts
///   its error into the declared one and `return` is checked against it; nothing where the
///   type is an `impl Trait` alone, which cannot be named in a body and is left to
///   inference, as for the handler itself.
fn declared_output(
    output: &ReturnType,
    generics: &Generics,
    locals: &Locals,
    at: Span,
) -> (TokenStream, Option<Type>) {
    let mut ty = match output {
        ReturnType::Type(_, ty) => (**ty).clone(),
        ReturnType::Default => parse_quote!(()),
    };
    let mut opaque = OpaqueTypes::default();
    opaque.visit_type_mut(&mut ty);
    let mut names = type_and_const_params(generics);
    names.extend(
        generics
            .lifetimes()
            .map(|lifetime| &lifetime.lifetime.ident),
    );
    // A trait's generic arguments may name the handler's generics, an enclosing `impl`'s
    // (which the attribute cannot tell from concrete types) or a lifetime: a bound with
    // any is left to a `use`.
    let (in_scope, local_only): (Vec<TraitBound>, Vec<TraitBound>) =
        opaque.traits.into_iter().partition(|bound| {
            let tokens = bound.to_token_stream();
            bound.lifetimes.is_some()
                || bound
                    .path
                    .segments
                    .iter()
                    .any(|segment| !matches!(segment.arguments, PathArguments::None))
                || names_lifetime(tokens.clone())
                || mentions_any(tokens, &names)
                || mentions_self(bound)
        });
    let params = (0..local_only.len()).map(|index| locals.name(&format!("__IdemT{index}"), at));
    let function = locals.name("__idem_traits", at);
    let nested =
        (!local_only.is_empty()).then(|| quote!(fn #function<#(#params: #local_only),*>() {}));
    let paths = in_scope.into_iter().map(|bound| {
        let mut path = bound.path;
        for segment in &mut path.segments {
            segment.arguments = PathArguments::None;
        }
        path
    });
    let uses = quote!(#nested #(#[allow(unused_imports)] use #paths as _;)*);
    (uses, (!matches!(ty, Type::Infer(_))).then_some(ty))
}

/// Replaces each `impl Trait` in a type with `_`, keeping the paths of the traits it names
/// (without their generic arguments, as a `use` names them).
#[derive(Default)]
struct OpaqueTypes {
    traits: Vec<TraitBound>,
}

impl VisitMut for OpaqueTypes {
    fn visit_type_mut(&mut self, ty: &mut Type) {
        visit_mut::visit_type_mut(self, ty);
        if let Type::ImplTrait(opaque) = ty {
            for bound in &opaque.bounds {
                if let TypeParamBound::Trait(bound) = bound {
                    self.traits.push(bound.clone());
                }
            }
            *ty = Type::Infer(TypeInfer {
                underscore_token: Token![_](opaque.impl_token.span),
            });
        }
    }
}

fn is_debug_handler(attr: &Attribute) -> bool {
    attr.path()
        .segments
        .last()
        .is_some_and(|segment| segment.ident == "debug_handler")
}

/// `#[axum::debug_handler]` as written, or, where it names no state, with the handler's:
/// it sees the generated signature, where a `State<T>` last argument shares a tuple with
/// the guard and so is not found by `debug_handler`'s own inference.
fn debug_handler_with_state(attr: &Attribute, state: Option<&RouterState>) -> TokenStream {
    match (&attr.meta, state) {
        (Meta::Path(path), Some(RouterState::Named(state) | RouterState::FromArgument(state)))
            if is_debug_handler(attr) =>
        {
            let pound = attr.pound_token;
            quote!(#pound[#path(state = #state)])
        }
        // An inner attribute of the body (`#![allow(..)]`) applies to the handler: it goes
        // on the handler the macro writes, as an outer one.
        _ if matches!(attr.style, syn::AttrStyle::Inner(_)) => {
            let mut outer = attr.clone();
            outer.style = syn::AttrStyle::Outer;
            outer.to_token_stream()
        }
        _ => attr.to_token_stream(),
    }
}

/// The generics with `Send + 'static` on every type parameter: the work runs in a task of
/// its own, which axum checks only once the handler is instantiated but `Idempotent::run`
/// needs here. The bounds go where the parameter's own are, inline or in the `where` clause,
/// so that the user's crate does not see one parameter bounded in two places. A name the
/// `where` clause bounds that the handler does not declare gets nothing: it may be a
/// concrete type as well as a type parameter of the enclosing `impl`, whose bounds are the
/// user's to write.
fn send_static(generics: &Generics) -> Generics {
    let mut generics = generics.clone();
    let bounded_in_where = bounded_in_where(&generics);
    let mut in_where: Vec<Ident> = Vec::new();
    for param in generics.type_params_mut() {
        if param.bounds.is_empty() && bounded_in_where.contains(&param.ident) {
            in_where.push(param.ident.clone());
        } else {
            param.bounds.push(parse_quote!(::core::marker::Send));
            param.bounds.push(parse_quote!('static));
        }
    }
    if !in_where.is_empty() {
        let predicates = &mut generics.make_where_clause().predicates;
        for name in in_where {
            predicates.push(parse_quote!(#name: ::core::marker::Send + 'static));
        }
    }
    generics
}

/// The names a `where` predicate of the handler bounds, each a path of one segment.
fn bounded_in_where(generics: &Generics) -> Vec<Ident> {
    generics
        .where_clause
        .iter()
        .flat_map(|clause| &clause.predicates)
        .filter_map(|predicate| match predicate {
            WherePredicate::Type(PredicateType {
                bounded_ty: Type::Path(path),
                ..
            }) if path.qself.is_none() => path.path.get_ident().cloned(),
            _ => None,
        })
        .collect()
}

/// The names the handler's `where` clause bounds without declaring them: the type
/// parameters of an enclosing `impl` the handler names there, which the attribute cannot
/// see otherwise.
fn outer_params(generics: &Generics) -> Vec<&Ident> {
    let declared = declared_params(generics);
    let mut outer: Vec<&Ident> = Vec::new();
    for predicate in generics
        .where_clause
        .iter()
        .flat_map(|clause| &clause.predicates)
    {
        if let WherePredicate::Type(PredicateType {
            bounded_ty: Type::Path(path),
            ..
        }) = predicate
            && path.qself.is_none()
            && let Some(name) = path.path.get_ident()
            && !declared.contains(&name)
            && !outer.contains(&name)
        {
            outer.push(name);
        }
    }
    outer
}

fn declared_params(generics: &Generics) -> Vec<&Ident> {
    generics
        .params
        .iter()
        .filter_map(|param| match param {
            GenericParam::Type(param) => Some(&param.ident),
            GenericParam::Const(param) => Some(&param.ident),
            GenericParam::Lifetime(_) => None,
        })
        .collect()
}

/// The generic parameters the handler's types may name: its own type and const
/// parameters, and those of an enclosing `impl` its `where` clause names.
fn type_and_const_params(generics: &Generics) -> Vec<&Ident> {
    let mut params = declared_params(generics);
    params.extend(outer_params(generics));
    params
}

/// One check per argument, reported on its type: the last may consume the body
/// (`FromRequest`), the others only read the head (`FromRequestParts`), both for the
/// router's state. Axum's own check at `.route(...)` has to do where the state cannot be
/// told (several different `State<_>` arguments and no `state = ...`), and for types that
/// name a generic parameter, which axum checks only once the handler is instantiated.
fn extractor_checks(
    root: &TokenStream,
    state: Option<&RouterState>,
    generics: &syn::Generics,
    arguments: &[&PatType],
) -> Vec<TokenStream> {
    let (state, suffix) = match state {
        Some(RouterState::Named(state)) => (state.clone(), ""),
        Some(RouterState::FromArgument(state)) => (state.clone(), "_inferred"),
        Some(RouterState::Unit) => (quote!(()), "_unit"),
        None => return Vec::new(),
    };
    let params = type_and_const_params(generics);
    if mentions_any(state.clone(), &params) {
        return Vec::new();
    }
    let last = arguments.len().saturating_sub(1);
    arguments
        .iter()
        .enumerate()
        .filter(|(_, argument)| !mentions_any(argument.ty.to_token_stream(), &params))
        .map(|(index, argument)| {
            let ty = &argument.ty;
            let (start, end) = span_range(ty);
            let (check, infer) = if index == last {
                (format!("last_extractor{suffix}"), quote_spanned!(end=> , _))
            } else {
                (format!("parts_extractor{suffix}"), TokenStream::new())
            };
            let check = Ident::new(&check, start);
            let open = quote_spanned!(start=> let _ = #root::__private::#check::<);
            let close = quote_spanned!(end=> >;);
            let cfg = cfg_condition(&argument.attrs).map(|condition| quote!(#[cfg(#condition)]));
            quote!(#cfg #open #ty, #state #infer #close)
        })
        .collect()
}

/// Whether `tokens` name a lifetime other than `'static`.
fn names_lifetime(tokens: TokenStream) -> bool {
    let mut tokens = tokens.into_iter().peekable();
    while let Some(token) = tokens.next() {
        match token {
            TokenTree::Punct(punct)
                if punct.as_char() == '\''
                    && !matches!(tokens.peek(), Some(TokenTree::Ident(ident)) if ident == "static") =>
            {
                return true;
            }
            TokenTree::Group(group) if names_lifetime(group.stream()) => return true,
            _ => {}
        }
    }
    false
}

fn mentions_self(bound: &TraitBound) -> bool {
    let self_type = Ident::new("Self", Span::call_site());
    mentions_any(bound.to_token_stream(), &[&self_type])
}

fn mentions_any(tokens: TokenStream, names: &[&Ident]) -> bool {
    !names.is_empty()
        && tokens.into_iter().any(|token| match token {
            TokenTree::Ident(ident) => names.iter().any(|name| **name == ident),
            TokenTree::Group(group) => mentions_any(group.stream(), names),
            TokenTree::Punct(_) | TokenTree::Literal(_) => false,
        })
}

/// The router's state the extractor checks are written for, and where the attribute took
/// it from, which a wrong extractor's message repeats.
enum RouterState {
    /// Named by `state = ...`.
    Named(TokenStream),
    /// `T` of the handler's `State<T>` arguments.
    FromArgument(TokenStream),
    /// `()`, for a handler that takes no `State<_>`.
    Unit,
}

/// The state a handler is written for: `X` of its `State<X>` arguments, `()` without one,
/// `None` when they disagree.
fn state_from_arguments(arguments: &[&PatType]) -> Option<RouterState> {
    let mut states: Vec<TokenStream> = Vec::new();
    for argument in arguments {
        if let Some(state) = state_type(&argument.ty) {
            let state = state.to_token_stream();
            if !states
                .iter()
                .any(|seen| seen.to_string() == state.to_string())
            {
                states.push(state);
            }
        }
    }
    match states.len() {
        0 => Some(RouterState::Unit),
        1 => states.pop().map(RouterState::FromArgument),
        _ => None,
    }
}

fn state_type(ty: &Type) -> Option<&Type> {
    let Type::Path(path) = ty else {
        return None;
    };
    let segment = path.path.segments.last()?;
    let PathArguments::AngleBracketed(generic) = &segment.arguments else {
        return None;
    };
    match generic.args.first() {
        Some(GenericArgument::Type(state))
            if segment.ident == "State" && generic.args.len() == 1 =>
        {
            Some(state)
        }
        _ => None,
    }
}

/// The spans of the first and last tokens of `tokens`: generated tokens spanned from one
/// to the other make rustc underline all of `tokens`.
fn span_range(tokens: &impl ToTokens) -> (Span, Span) {
    let mut tokens = tokens.to_token_stream().into_iter();
    let start = tokens
        .next()
        .map_or_else(Span::call_site, |token| token.span());
    let end = tokens.last().map_or(start, |token| token.span());
    (start, end)
}
